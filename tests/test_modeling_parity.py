"""Our Ovis2 against transformers' own Ovis2ForConditionalGeneration on tiny random checkpoints.

Tolerance: fp32 logits within 10 x transformers' own implementation noise for the same comparison (its eager-vs-SDPA
difference at the positions compared; for a padded row against the prompt alone, transformers' own padded-vs-alone
difference), and never below FLOAT32_ULPS float32 ulps at the logits' scale: a forward pass that sums in another
order moves logits of magnitude 44 by 1e-4, so any floor must scale with them.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from ovis2.modeling import Ovis2ForConditionalGeneration
from ovis2.tokenizer import IMAGE_ATOM_ID
from tests.checkpoints import SHAPES, prompt_ids, random_pixels

TEXT_A = [151644, 872, 198, 3838, 374, 6839]
TEXT_B = [30, 151645, 198, 151644, 77091, 198]
TEXT_C = [9707, 11, 1879, 0]

CASES = {
    "text_only": dict(chunks=[TEXT_A + TEXT_B], grids=[]),
    "one_image_tiles": dict(chunks=[TEXT_A, TEXT_B], grids=[(2, 2)]),
    "two_images": dict(chunks=[TEXT_A, TEXT_C, TEXT_B], grids=[(1, 3), (1, 1)]),
}


def load_reference(directory, attn_implementation="sdpa", identity_final_norm=False):
    model = transformers.Ovis2ForConditionalGeneration.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    if identity_final_norm:
        model.model.vision_tower.transformer.rms_norm = torch.nn.Identity()
    return model


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """name -> (ours with compat transformers, ours with compat ovis, reference sdpa, reference eager)."""
    loaded = {}
    for name, directory in tiny_checkpoints.items():
        ours_t = Ovis2ForConditionalGeneration.from_pretrained(
            str(directory), dtype="float32", compat="transformers"
        )
        ours_o = Ovis2ForConditionalGeneration.from_pretrained(str(directory), dtype="float32", compat="ovis")
        loaded[name] = (ours_t, ours_o, load_reference(directory), load_reference(directory, "eager"))
    return loaded


def case_inputs(case: str, tokens_per_crop: int, seed: int = 0):
    spec = CASES[case]
    ids = torch.tensor([prompt_ids(spec["chunks"], spec["grids"], tokens_per_crop)])
    pixels = random_pixels(spec["grids"], seed) if spec["grids"] else None
    return ids, pixels


def kept_positions(ids: torch.Tensor) -> torch.Tensor:
    """Every text position and every 32nd position overall: full-vocabulary logits of a long image prompt
    would take gigabytes."""
    row = ids[0] if ids.dim() == 2 else ids
    keep = (row != IMAGE_ATOM_ID) | (torch.arange(row.shape[0]) % 32 == 0)
    return keep.nonzero().squeeze(-1)


FLOAT32_ULPS = 64  # a few layers of sums in another order; 3e-6 relative was measured on Sapphire Rapids


def float32_noise(values: torch.Tensor) -> float:
    return FLOAT32_ULPS * torch.finfo(torch.float32).eps * values.abs().max().item()


def tolerance(reference_sdpa, reference_eager, positions=None, **inputs) -> float:
    """10 x the reference's eager-vs-SDPA difference at `positions` (a mask or index; all when None)."""
    with torch.inference_mode():
        sdpa, eager = reference_sdpa(**inputs).logits, reference_eager(**inputs).logits
    if positions is not None:  # padded positions hold whatever each attention makes of an all-masked row
        sdpa, eager = sdpa[positions], eager[positions]
    return max(10 * (sdpa - eager).abs().max().item(), float32_noise(sdpa))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(models, shape, case):
    ours, _, ref, ref_eager = models[shape]
    ids, pixels = case_inputs(case, ours.config.vision_config.tokens_per_crop)
    inputs = dict(input_ids=ids, pixel_values=pixels, logits_to_keep=kept_positions(ids))
    with torch.inference_mode():
        expected = ref(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tolerance(ref, ref_eager, **inputs)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_left_padded_batch_matches_transformers(models, shape):
    ours, _, ref, ref_eager = models[shape]
    per_crop = ours.config.vision_config.tokens_per_crop
    long_ids = prompt_ids([TEXT_A, TEXT_B], [(1, 2)], per_crop)
    short_ids = prompt_ids([TEXT_C, TEXT_B], [(1, 1)], per_crop)
    pad = len(long_ids) - len(short_ids)
    ids = torch.tensor([long_ids, [151643] * pad + short_ids])
    mask = torch.tensor([[1] * len(long_ids), [0] * pad + [1] * len(short_ids)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    pixels = random_pixels([(1, 2), (1, 1)], seed=3)
    keep = kept_positions(ids[0])
    inputs = dict(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions, logits_to_keep=keep
    )
    with torch.inference_mode():
        expected = ref(**inputs).logits
        got = ours(**inputs).logits
    real = mask.bool()[:, keep]
    assert (got[real] - expected[real]).abs().max().item() <= tolerance(ref, ref_eager, real, **inputs)
    # the padded row also equals its prompt run alone, as closely as transformers' padded row equals its own
    alone_inputs = dict(input_ids=torch.tensor([short_ids]), pixel_values=pixels[3:])
    with torch.inference_mode():
        alone, reference_alone = ours(**alone_inputs).logits[0], ref(**alone_inputs).logits[0]
    in_row, positions = keep >= pad, keep[keep >= pad] - pad
    reference_gap = (expected[1][in_row] - reference_alone[positions]).abs().max().item()
    gap = (got[1][in_row] - alone[positions]).abs().max().item()
    assert gap <= max(10 * reference_gap, float32_noise(alone))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", ["text_only", "one_image_tiles"])
def test_greedy_32_tokens_identical(models, shape, case):
    ours, _, ref, _ = models[shape]
    ids, pixels = case_inputs(case, ours.config.vision_config.tokens_per_crop, seed=1)
    kwargs = dict(input_ids=ids, max_new_tokens=32, do_sample=False)
    if pixels is not None:
        kwargs["pixel_values"] = pixels
    with torch.inference_mode():
        expected = ref.generate(**kwargs, eos_token_id=[151645, 151643], pad_token_id=151643)
    got = ours.generate(**kwargs)
    assert got.tolist() == expected.tolist()
    assert got.shape[1] > ids.shape[1]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_compat_ovis_equals_transformers_without_final_norm(models, tiny_checkpoints, shape):
    ours_t, ours_o, _, _ = models[shape]
    reference = load_reference(tiny_checkpoints[shape], identity_final_norm=True)
    reference_eager = load_reference(tiny_checkpoints[shape], "eager", identity_final_norm=True)
    ids, pixels = case_inputs("one_image_tiles", ours_o.config.vision_config.tokens_per_crop, seed=2)
    inputs = dict(input_ids=ids, pixel_values=pixels, logits_to_keep=kept_positions(ids))
    with torch.inference_mode():
        expected = reference(**inputs).logits
        got = ours_o(**inputs).logits
        with_norm = ours_t(**inputs).logits
    allowed = tolerance(reference, reference_eager, **inputs)
    assert (got - expected).abs().max().item() <= allowed
    assert (with_norm - got).abs().max().item() > 100 * allowed  # the final norm really changes the answer
