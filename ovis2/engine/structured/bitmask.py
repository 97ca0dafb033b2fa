"""The allowed-token bitmask of a step's constrained rows, applied to their logits in one batched call.

Each matcher fills its row of one [B, ceil(V / 32)] int32 CPU bitmask (bit j of a row: token j allowed); rows
whose matcher allows every token, and the unconstrained rows, are left out of the call. On CUDA the filling
happens while the step's forward pass is still running. The apply uses xgrammar's CPU kernel on CPU and its
plain-torch kernel elsewhere (its Triton kernel would need a C compiler at run time, which the image lacks).
"""

from __future__ import annotations

import torch

BITS = 32


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + BITS - 1) // BITS


def apply_grammar_bitmask(logits: torch.Tensor, matchers: list) -> None:
    """logits: [B, V], changed in place: each row with a matcher gets -inf on the tokens its grammar forbids."""
    constrained = [i for i, matcher in enumerate(matchers) if matcher is not None]
    if not constrained:
        return
    bitmask = torch.empty((logits.shape[0], bitmask_width(logits.shape[-1])), dtype=torch.int32)  # [B, W]
    filled = [i for i in constrained if matchers[i].fill_bitmask(bitmask, i)]
    # A row allowing nothing would be all -inf, which no sampling arithmetic survives: it is left unmasked, and
    # the token it draws is refused by its matcher, which fails the request as a dead end.
    allows_some = bitmask.any(dim=1).tolist()
    masked = [i for i in filled if allows_some[i]]
    if not masked:
        return
    from xgrammar import apply_token_bitmask_inplace

    backend = "cpu" if logits.device.type == "cpu" else "torch_native"
    apply_token_bitmask_inplace(
        logits,
        bitmask.to(logits.device, non_blocking=True),
        vocab_size=logits.shape[-1],
        indices=masked,
        backend=backend,
    )
