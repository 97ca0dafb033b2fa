"""Videos through the engine: LLM.chat with video parts, frames counted apart from images, and a second turn that
resends the video served by the visual and prefix caches (the vision tower runs zero times)."""

from __future__ import annotations

import pytest

from ovis2.engine.engine_args import EngineArgs
from ovis2.engine.input_processor import InputProcessor
from ovis2.engine.sampling_params import SamplingParams
from ovis2.errors import Ovis2Error
from ovis2.llm import LLM
from ovis2.video import load_video
from tests.engine.conftest import GREEDY, run_to_completion


@pytest.fixture(scope="module")
def llm(engine_checkpoint):
    return LLM(
        model=str(engine_checkpoint),
        dtype="float32",
        device="cpu",
        kv_cache_memory=8 * 1024 * 1024,
        max_images_per_request=1,
        max_video_frames=16,
        max_video_frames_per_request=20,
    )


def video_turn(video, text: str = "What happens?", **extra) -> dict:
    return {
        "role": "user",
        "content": [{"type": "video", "video": video, **extra}, {"type": "text", "text": text}],
    }


def test_llm_chat_takes_paths_bytes_and_frame_lists(llm, videos, tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(videos.h264)
    params = SamplingParams(max_tokens=3, **GREEDY)
    from_path = llm.chat([[video_turn(str(path))]], params)[0]
    assert from_path.num_image_tokens == 12 * 259  # the recipe's 12 frames
    assert from_path.outputs[0].finish_reason in ("stop", "length")
    from_bytes = llm.engine.input_processor.chat_inputs([video_turn(videos.h264)])
    assert from_bytes.prompt_token_ids == from_path.prompt_token_ids
    assert len(from_bytes.images) == 12 and all(frame.is_video_frame for frame in from_bytes.images)
    frames = [image.copy() for image in load_video(videos.h264, 3).frames]
    listed = llm.engine.input_processor.chat_inputs([video_turn(frames)])
    assert [image.content_hash for image in listed.images] == [
        image.content_hash
        for image in llm.engine.input_processor.chat_inputs([video_turn(videos.h264, num_frames=3)]).images
    ]
    one = llm.chat([video_turn(videos.one_frame)], params)[0]
    assert one.num_image_tokens == 259 and one.outputs[0].finish_reason in ("stop", "length")


def test_frames_are_limited_apart_from_images(llm, videos):
    from PIL import Image

    image = {"type": "image", "image": Image.new("RGB", (40, 30), (9, 9, 9))}
    mixed = {"role": "user", "content": [image, {"type": "video", "video": videos.h264, "num_frames": 16}]}
    result = llm.chat([mixed], SamplingParams(max_tokens=1))[0]  # 1 image (the cap) + 16 frames: both fit
    assert result.num_image_tokens == 259 + 16 * 259
    with pytest.raises(Ovis2Error, match="20 are allowed"):  # 2 videos x 16 frames: past the frames cap
        llm.chat(
            [{"role": "user", "content": [{"type": "video", "video": videos.h264, "num_frames": 16}] * 2}]
        )
    with pytest.raises(Ovis2Error, match="1 to 16 frames"):
        llm.chat([video_turn(videos.h264, num_frames=17)])
    assert (
        llm.processor.prepare_chat([video_turn(videos.gop5, fps=100.0, num_frames=16)]).num_video_frames == 16
    )
    assert not llm.engine.has_unfinished_requests


def test_the_default_frame_count_is_the_recipes_within_the_cap(llm, engine_checkpoint, videos):
    args = EngineArgs(model=str(engine_checkpoint), max_video_frames=5)
    capped = InputProcessor(args, llm.engine.core.vocab_size, 4096, llm.tokenizer, llm.processor)
    assert capped.chat_inputs([video_turn(videos.h264)]).num_video_frames == 5
    assert capped.default_num_frames(fps=1.0) == 5 and llm.engine.input_processor.default_num_frames() == 12


def test_a_second_turn_resending_the_video_runs_the_vision_tower_zero_times(make_engine, videos):
    engine = make_engine()
    processor = engine.processor
    params = SamplingParams(max_tokens=4, **GREEDY)
    turn1 = [video_turn(videos.vp9, num_frames=4)]
    first = run_to_completion(engine, {"t1": (processor.prepare_chat(turn1), params)})["t1"]
    encoded = engine.core.runner.visual.num_encoded_images
    assert encoded == 4
    answer = {"role": "assistant", "content": first.outputs[0].text}
    turn2 = processor.prepare_chat([*turn1, answer, {"role": "user", "content": "And then?"}])
    again = processor.prepare_chat(turn1)
    second = run_to_completion(engine, {"t2": (turn2, params), "t1b": (again, params)})
    assert engine.core.runner.visual.num_encoded_images == encoded  # zero vision tower runs for either
    assert second["t1b"].outputs[0].token_ids == first.outputs[0].token_ids  # same tokens
    video_tokens = 4 * 259
    assert second["t2"].num_cached_tokens >= video_tokens  # the video's KV blocks are reused
