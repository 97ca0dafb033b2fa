"""Video parts of chat messages -> the frame image parts the Ovis2 video recipe puts in the prompt.

The recipe (model cards, docs/video.md): the sampled frames, each one crop (`max_partition=1`: 259 tokens),
and the prompt `"\\n".join(["<image>"] * n) + "\\n" + text`. The chat template renders an image part as
`<image>\\n`, so a video part followed by its text becomes exactly that when it is replaced by one image part per
frame. A video part is `{"type": "video", "video": <path | bytes | list of frames>}` with optional `"num_frames"`
(default 12, the recipe's) and `"fps"` (that many frames per second of the video, `num_frames` at most). For
counting tokens alone, a part may instead carry `"num_frames"` as the count its video gives and `"frame_size"`.
"""

from __future__ import annotations

from .errors import Ovis2Error
from .video import load_video
from .video_probe import VideoLimits
from .video_sampling import RECIPE_NUM_FRAMES

FRAME_PATCHES = 1  # max_partition=1: a frame is one crop, the thumbnail alone
VIDEO_KEYS = ("type", "video", "num_frames", "fps", "frame_size")


def has_video_parts(messages) -> bool:
    return any(part.get("type") == "video" for part in _list_parts(messages))


def expand_video_parts(messages, limits: VideoLimits | None = None, counting: bool = False) -> list:
    """The messages with each video part replaced by its frames as image parts (`"video_frame": True`, one crop).

    With `counting`, a part without `"video"` gives `"num_frames"` image parts of `"frame_size"` (no pixels)."""
    if not has_video_parts(messages):
        return messages
    expanded = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            message = {
                **message,
                "content": [frame for part in content for frame in _expand(part, limits, counting)],
            }
        expanded.append(message)
    return expanded


def _expand(part, limits: VideoLimits | None, counting: bool) -> list:
    if not isinstance(part, dict) or part.get("type") != "video":
        return [part]
    unknown = sorted(set(part) - set(VIDEO_KEYS))
    if unknown:
        raise Ovis2Error(f"a video part takes {', '.join(VIDEO_KEYS[1:])}; not {', '.join(unknown)}")
    if part.get("video") is None:
        if not counting:
            raise Ovis2Error(
                'a video part needs its video: {"type": "video", "video": <path, bytes or frames>}'
            )
        size = tuple(part.get("frame_size") or (448, 448))
        return [_frame_part({"image_size": size}) for _ in range(_count(part.get("num_frames")))]
    num_frames = _count(part.get("num_frames", RECIPE_NUM_FRAMES))
    sampled = load_video(part["video"], num_frames, part.get("fps"), limits or VideoLimits())
    return [_frame_part({"image": frame}) for frame in sampled.frames]


def _frame_part(fields: dict) -> dict:
    return {"type": "image", **fields, "max_patches": FRAME_PATCHES, "video_frame": True}


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Ovis2Error(f"a video part's num_frames must be a positive integer, got {value!r}")
    return value


def _list_parts(messages) -> list:
    parts = []
    for message in messages if isinstance(messages, (list, tuple)) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            parts += [part for part in content if isinstance(part, dict)]
    return parts
