"""OpenAI chat messages -> the processor's messages and EngineInputs: images fetched and decoded under the pixel
budget, videos sampled, both within the server's limits and tile cap; or, for /tokenize, the token ids from the
images' sizes and the videos' frame counts alone."""

from __future__ import annotations

from .aio import finish_in_thread
from .engine_api import LONGEST_TOKEN_CHARS, EngineInputs
from .errors import bad_request
from .media.media_loader import decoded_media, video_frame_counts
from .protocol import ChatMessage, ImagePart, TextPart, VideoPart
from .state import ServerState
from .videos import VideoOptions, checked_videos


def image_parts(messages: list[ChatMessage]) -> list[tuple[ImagePart, str]]:
    found = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    found.append((part, f"messages[{i}].content[{j}].image_url"))
    return found


def max_tiles(state: ServerState, requested: int | None) -> int | None:
    """The tile cap for this request's images: the request's, within the server's (low-detail images get 1), else
    the flag's, else None: the processor's default (the compat's; compat ovis gives 4 to each of several images).

    A request may lower the server's cap, never raise it, whether the cap is the flag or the compat's default."""
    server_cap = state.max_tiles_per_image
    if requested is not None and server_cap is not None and requested > server_cap:
        raise bad_request(
            f"max_tiles_per_image is {requested}; this server allows at most {server_cap}",
            "max_tiles_per_image",
        )
    return requested if requested is not None else state.settings.max_tiles_per_image


def processor_messages(
    messages: list[ChatMessage], image_fields: list[dict], video_fields: list[dict] = ()
) -> list[dict]:
    """OpenAI messages in the processor's form: image parts carry, in order, `image_fields` (the decoded image,
    `{"image": img}`, or only its size, `{"image_size": (w, h)}`), video parts `video_fields` (the sampled frames,
    `{"video": [img, ...]}`, or only their count and size)."""
    pending, pending_videos = iter(image_fields), iter(video_fields)
    result = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if not isinstance(message.content, list):
            result.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                low = part.image_url.detail == "low"  # one crop: the thumbnail, 259 tokens
                parts.append({"type": "image", **next(pending), **({"max_patches": 1} if low else {})})
            elif isinstance(part, VideoPart):
                parts.append({"type": "video", **next(pending_videos)})
        result.append({"role": role, "content": parts})
    return result


def check_text_fits(state: ServerState, messages: list[ChatMessage]) -> None:
    """A 400 for messages whose text alone is too long for the context at any tokenization (no token is longer
    than LONGEST_TOKEN_CHARS), before anything tokenizes it: a multi-megabyte text costs seconds of CPU."""
    chars = sum(len(text) for text in message_texts(messages))
    limit = state.max_model_len * LONGEST_TOKEN_CHARS
    if chars > limit:
        raise bad_request(
            f"the messages hold {chars} characters of text, more than the model's context of {state.max_model_len} "
            f"tokens can hold (a token is at most {LONGEST_TOKEN_CHARS} characters); shorten the messages",
            "messages",
        )


def message_texts(messages: list[ChatMessage]):
    for message in messages:
        if isinstance(message.content, str):
            yield message.content
        elif isinstance(message.content, list):
            yield from (part.text for part in message.content if isinstance(part, TextPart))


def checked_images(state: ServerState, messages: list[ChatMessage], requested_tiles: int | None):
    """(the image URLs with their params, the tile cap): the request's images within the server's limits."""
    found = image_parts(messages)
    limit = state.settings.max_images_per_request
    if len(found) > limit:
        raise bad_request(f"the request has {len(found)} images; at most {limit} are allowed", "messages")
    return [(part.image_url.url, param) for part, param in found], max_tiles(state, requested_tiles)


async def build_chat_inputs(
    state: ServerState,
    messages: list[ChatMessage],
    requested_tiles: int | None,
    video: VideoOptions = VideoOptions(),
) -> EngineInputs:
    """Fetch and decode every image and video at once, then let the processor build the prompt (in a thread)."""
    check_text_fits(state, messages)
    urls, tiles = checked_images(state, messages, requested_tiles)
    videos = checked_videos(state, messages, video)
    frames_cap = state.settings.max_video_frames_per_request
    with state.media_bytes.hold() as hold:
        async with decoded_media(state.images, state.videos, urls, videos, frames_cap, hold) as media:
            images, frames = media
            prompt = processor_messages(
                messages,
                [{"image": image} for image in images],
                [{"video": list(f), "num_frames": len(f)} for f in frames],
            )
            return await finish_in_thread(state.engine.processor.prepare_chat, prompt, tiles)


async def chat_token_ids(
    state: ServerState,
    messages: list[ChatMessage],
    requested_tiles: int | None,
    video: VideoOptions = VideoOptions(),
) -> tuple[list[int], int]:
    """(prompt ids, image and frame tokens) from the images' sizes alone, fetched and header-checked, and the
    videos' frame counts, from their packets: nothing is decoded."""
    check_text_fits(state, messages)
    urls, tiles = checked_images(state, messages, requested_tiles)
    videos = checked_videos(state, messages, video)
    with state.media_bytes.hold() as hold:
        sizes = await state.images.sizes(urls, hold)
        counts = await video_frame_counts(state.videos, videos, hold)
    prompt = processor_messages(
        messages,
        [{"image_size": size} for size in sizes],
        [{"num_frames": n, "frame_size": size} for n, size in counts],
    )
    return await finish_in_thread(state.engine.processor.chat_token_ids, prompt, tiles)
