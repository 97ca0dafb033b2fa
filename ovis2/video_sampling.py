"""Which frames of a video the Ovis2 recipe looks at: evenly spaced, at the midpoints of equal intervals.

The Ovis2 model cards take `num_frames` (12) frames of a video with T frames: all of them when T <= num_frames,
else index `int((stride * i + stride * (i + 1)) / 2)` (floats, as the card computes it) of each interval i,
stride = T / num_frames, read at time index / fps. Here T is the number of frames the container really holds
and the time is `index / T` of the video's measured span, so a constant frame rate video gets exactly the model
card's frames, and a variable frame rate one the frames on screen at those evenly spaced times.
docs/video.md has the sources.
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction

from .errors import Ovis2Error

RECIPE_NUM_FRAMES = 12  # the Ovis2 model cards' video example
TRAINING_NUM_FRAMES = 10  # the v2.0 training code's min_frames = max_frames default (for the record)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The model card's rule on a list of `total` frames: every index when total <= num_frames, else the
    midpoint index of each of `num_frames` equal intervals."""
    _check_count(num_frames)
    if total <= num_frames:
        return list(range(total))
    stride = total / num_frames
    return [min(total - 1, int((stride * i + stride * (i + 1)) / 2)) for i in range(num_frames)]


def sample_timestamps(timestamps: list[int], end: int, num_frames: int) -> list[int]:
    """The presentation timestamps (sorted, distinct, in stream units) of the frames the recipe picks: all of
    them when there are no more than `num_frames`, else for each of `sample_indices(len(timestamps), num_frames)`
    the frame on screen at `index / T` of the span [timestamps[0], end), computed exactly. `end` is where the
    last frame stops showing."""
    _check_count(num_frames)
    if not timestamps:
        raise Ovis2Error("the video has no frames")
    if len(timestamps) <= num_frames:
        return list(timestamps)
    total, start = len(timestamps), timestamps[0]
    span = max(end - start, 1)
    picked = []
    for index in sample_indices(total, num_frames):
        moment = start + Fraction(index * span, total)
        picked.append(timestamps[max(0, bisect.bisect_right(timestamps, moment) - 1)])
    return picked


def frames_for_fps(duration_seconds: float, fps: float, cap: int) -> int:
    """How many frames `fps` frames per second of a video this long asks for: at least 1, at most `cap`."""
    if not fps > 0 or not math.isfinite(fps):
        raise Ovis2Error(f"fps must be a positive number, got {fps}")
    return max(1, min(cap, round(duration_seconds * fps)))


def _check_count(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise Ovis2Error(f"num_frames must be a positive integer, got {num_frames!r}")
