"""`video_url` parts of a chat request: found, checked against the server's limits, and how many frames each
gives: the request's `num_video_frames` (1 to --max-video-frames; default 12, the Ovis2 recipe's) or, with
`video_fps`, that many frames per second of video, `num_video_frames` (default --max-video-frames) at most."""

from __future__ import annotations

from dataclasses import dataclass

from .engine_api import RECIPE_NUM_FRAMES
from .errors import bad_request
from .media.media_loader import VideoURL
from .media.video import FrameRequest
from .protocol import ChatMessage, VideoPart
from .state import ServerState


@dataclass(frozen=True)
class VideoOptions:
    num_frames: int | None = None
    fps: float | None = None


def video_options(request) -> VideoOptions:
    """The request's video fields (chat and /tokenize requests carry the same two)."""
    return VideoOptions(getattr(request, "num_video_frames", None), getattr(request, "video_fps", None))


def video_parts(messages: list[ChatMessage]) -> list[tuple[VideoPart, str]]:
    found = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, VideoPart):
                    found.append((part, f"messages[{i}].content[{j}].video_url"))
    return found


def checked_videos(state: ServerState, messages: list[ChatMessage], options: VideoOptions) -> list[VideoURL]:
    """(url, frames wanted, param) of each video part, within the server's limits."""
    found = video_parts(messages)
    limit = state.settings.max_videos_per_request
    if len(found) > limit:
        raise bad_request(f"the request has {len(found)} videos; at most {limit} are allowed", "messages")
    cap = state.settings.max_video_frames
    if options.num_frames is not None and options.num_frames > cap:
        raise bad_request(
            f"num_video_frames is {options.num_frames}; this server samples at most {cap} frames a video",
            "num_video_frames",
        )
    count = options.num_frames or (cap if options.fps is not None else min(RECIPE_NUM_FRAMES, cap))
    frames = FrameRequest(count, options.fps)
    return [(part.video_url.url, frames, param) for part, param in found]
