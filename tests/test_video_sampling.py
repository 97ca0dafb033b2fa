"""Which frames the recipe picks (ovis2/video_sampling.py), against the model card's own arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest

from ovis2.errors import Ovis2Error
from ovis2.video_sampling import RECIPE_NUM_FRAMES, frames_for_fps, sample_indices, sample_timestamps


def model_card_indices(total_frames: int, num_frames: int) -> list[int]:
    """The Ovis2 model cards' video example, as it is written there (floats included)."""
    if total_frames <= num_frames:
        return list(range(total_frames))
    stride = total_frames / num_frames
    return [min(total_frames - 1, int((stride * i + stride * (i + 1)) / 2)) for i in range(num_frames)]


@pytest.mark.parametrize("num_frames", [1, 2, 5, 10, RECIPE_NUM_FRAMES, 16, 32])
def test_indices_are_the_model_cards_for_every_length(num_frames):
    for total in range(1, 2000):
        assert sample_indices(total, num_frames) == model_card_indices(total, num_frames), total


def test_a_video_no_longer_than_the_count_gives_every_frame():
    assert sample_indices(5, 12) == [0, 1, 2, 3, 4]
    assert sample_timestamps([7, 9, 11], 13, 12) == [7, 9, 11]
    assert sample_timestamps([0], 512, 12) == [0]


def test_constant_frame_rate_timestamps_are_the_model_cards_frames():
    for total, step, start in ((24, 1024, 0), (30, 512, 1024), (1800, 512, 0), (97, 3, 5)):
        timestamps = [start + step * k for k in range(total)]
        picked = sample_timestamps(timestamps, start + step * total, 12)
        assert picked == [timestamps[i] for i in model_card_indices(total, 12)]


def test_variable_frame_rate_picks_the_frame_on_screen_at_evenly_spaced_times():
    timestamps = [0, 10, 20, 30, 400, 410, 900, 905, 910, 990]
    end = 1000
    picked = sample_timestamps(timestamps, end, 4)
    expected = []
    for index in model_card_indices(len(timestamps), 4):  # the card's index, read at time index / fps
        moment = Fraction(index * end, len(timestamps))
        expected.append(max(t for t in timestamps if t <= moment))
    assert picked == expected and len(set(picked)) < len(picked)  # a still stretch shows one frame twice


def test_frames_for_fps():
    assert frames_for_fps(10.0, 1.0, 32) == 10
    assert frames_for_fps(10.0, 2.5, 12) == 12  # capped
    assert frames_for_fps(0.04, 1.0, 12) == 1  # never zero
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(Ovis2Error, match="fps"):
            frames_for_fps(1.0, bad, 12)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "12", None])
def test_a_frame_count_must_be_a_positive_integer(bad):
    with pytest.raises(Ovis2Error, match="num_frames"):
        sample_indices(10, bad)


def test_no_frames_is_an_error():
    with pytest.raises(Ovis2Error, match="no frames"):
        sample_timestamps([], 0, 12)
