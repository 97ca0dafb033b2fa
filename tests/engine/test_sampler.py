import math

import pytest
import torch

from ovis2.engine.sampler import SamplingRow, sample
from ovis2.engine.sampling_params import SamplingParams
from ovis2.errors import Ovis2Error
from ovis2.logits_processing import apply_min_p, apply_top_k, apply_top_p


def row(generator_seed=None, prompt=(), output=(), **params):
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    return SamplingRow(SamplingParams(**params), list(prompt), list(output), generator)


def test_greedy_is_the_argmax_of_the_fp32_logits():
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    out = sample(logits, [row(temperature=0)] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_a_temperature_below_1e_5_is_greedy_even_at_exact_ties():
    tied = torch.zeros(1, 100)
    drawn = {sample(tied, [row(seed, temperature=1e-6)]).token_ids[0] for seed in range(20)}
    assert drawn == {int(tied.argmax(-1))}
    assert len({sample(tied, [row(seed, temperature=1e-4)]).token_ids[0] for seed in range(20)}) > 1


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))

    def draw(indices):
        return [
            sample(logits[indices], [row(7 + i, temperature=1.0) for i in indices]).token_ids
            for _ in range(1)
        ][0]

    alone = [draw([i])[0] for i in range(4)]
    together = draw([0, 1, 2, 3])
    assert alone == together


def test_top_k_top_p_min_p_filter_as_specified():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(apply_top_k(logits, [2])).tolist() == [[False, False, True, True]]
    assert torch.isinf(apply_top_p(logits, torch.tensor([0.8]))).tolist() == [[False, False, True, True]]
    for tiny in (
        torch.tensor([1e-300], dtype=torch.float64),
        torch.tensor([1e-46]),
    ):  # the latter rounds to 0
        assert torch.isinf(apply_top_p(logits, tiny)).tolist() == [[False, True, True, True]]
    probs = apply_min_p(logits.softmax(-1), torch.tensor([0.5]))
    assert (probs > 0).tolist() == [[True, True, False, False]]


def test_top_k_1_sampling_is_greedy():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    out = sample(logits, [row(i, temperature=2.0, top_k=1) for i in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_penalties_and_logit_bias():
    logits = torch.full((1, 10), 0.5)
    logits[0, 3] = 2.0
    assert sample(logits, [row(temperature=0, logit_bias={5: 5.0})]).token_ids == [5]
    assert sample(logits, [row(temperature=0, output=[3, 3], frequency_penalty=1.5)]).token_ids != [3]
    assert sample(logits, [row(temperature=0, prompt=[3], repetition_penalty=100.0)]).token_ids != [3]
    assert sample(logits, [row(temperature=0, output=[3], presence_penalty=2.0)]).token_ids != [3]
    assert sample(logits, [row(temperature=0, output=[3], presence_penalty=1.0)]).token_ids == [3]


def test_min_tokens_masks_the_stop_ids():
    logits = torch.zeros(1, 151700)
    logits[0, 151645] = 10.0
    assert sample(logits, [row(temperature=0, min_tokens=2, output=[1])]).token_ids != [151645]
    assert sample(logits, [row(temperature=0, min_tokens=2, output=[1, 2])]).token_ids == [151645]


def test_logprobs_are_the_raw_distribution_with_top_k():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    out = sample(logits, [row(temperature=0, logprobs=2)])
    chosen, top = out.logprobs[0]
    assert math.isclose(chosen, math.log(0.6), rel_tol=1e-5)
    assert [t for t, _ in top] == [0, 1]


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(n=0),
        dict(n=100),
        dict(logprobs=50),
        dict(max_tokens=0),
    ],
)
def test_invalid_values_raise_a_clear_error(bad):
    with pytest.raises(Ovis2Error):
        SamplingParams(**bad)


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    from ovis2.logits_processing import draw

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    counts = torch.zeros(2, 5)
    for _ in range(4000):
        ids = draw(probs, generators)
        counts[0, ids[0]] += 1
        counts[1, ids[1]] += 1
    assert counts[0, 1] == 0 and counts[0, 4] == 0 and counts[1, 4] == 4000
    deviations = 4 * (probs[0] * (1 - probs[0]) / 4000).sqrt()  # 4 standard deviations of each frequency
    assert ((counts[0] / 4000 - probs[0]).abs() <= deviations).all()
    again = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    first = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    assert [draw(probs, again).tolist() for _ in range(20)] == [
        draw(probs, first).tolist() for _ in range(20)
    ]


def _top_p_by_sorting(logits, top_p):
    """The textbook nucleus over the same probabilities: sort all of them, keep the prefix whose mass before
    each token (summed in float64) is below top_p."""
    sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1, dtype=torch.float64) - sorted_probs >= top_p[:, None]
    drop[:, 0] = False
    return torch.zeros_like(logits).scatter_(-1, order, torch.where(drop, float("-inf"), 0.0))


def test_top_p_matches_sorting_for_peaked_and_flat_rows():
    generator = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, 151936, generator=generator) * 4  # the set lies within the top 1024
    flat = torch.randn(2, 151936, generator=generator) * 0.01  # the set spans most of the vocabulary
    logits = torch.cat([peaked, flat])
    top_p = torch.tensor([0.9, 0.5, 0.99, 0.9, 0.3])
    ours, reference = ~torch.isinf(apply_top_p(logits, top_p)), ~torch.isinf(_top_p_by_sorting(logits, top_p))
    assert not (reference & ~ours).any()  # everything the sorted prefix keeps
    probs = logits.softmax(dim=-1)
    for row in range(5):  # and beyond it only tokens tied with the least likely one it keeps
        floor = probs[row][reference[row]].min()
        assert torch.equal(
            probs[row][ours[row] & ~reference[row]],
            torch.full_like(probs[row][ours[row] & ~reference[row]], floor),
        )
    kept = ours.sum(dim=-1)
    assert kept[3] > 1024 and kept[0] < 1024  # both paths ran


def test_top_p_keeps_ties_with_the_last_token_kept():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -5.0]])
    kept = ~torch.isinf(apply_top_p(logits, torch.tensor([0.5])))
    assert kept.tolist() == [[True, True, True, True, False]]
