"""Linears that read the same input (q/k/v, gate/up) computed as one product over one packed weight on CPU
(`cpu_linear.packed_form`: oneDNN's layout, or `bf16_rows`' panels on CPUs that emulate bf16).

A decode step of Ovis2-1B calls ~170 products; q, k and v (896 -> 896, 128, 128) and gate and up (896 -> 4864
twice) each read the same row. One packed weight per group makes 96 calls of 24 layers out of 168 products, and
lets RoPE run once over q and k together: 2.2-2.5 ms less per batch-1 step of 24 layers on a 2-core Zen 5 with
AVX512-BF16 (bench/RESULTS.md). The members' plain weights are freed, as `Linear.pack` frees one; each member
reads its rows back from the packed weight when its state dict is saved or it is unpacked.
"""

from __future__ import annotations

import torch

from .cpu_linear import (
    DECODE_ROWS_HINT,
    Linear,
    Packed,
    dense_of,
    packed_form,
    packed_product,
    packs_weights,
    weights_changed,
)
from .packed_gemv import OneRowProduct


class FusedLinears:
    """One packed weight holding the rows of several `Linear` members, in order; calling it gives their
    outputs side by side along the last dimension. Once any member takes its own weight back (a state dict
    loaded, a `.to()`, `unpack`), `release` gives every member its own and drops the packed weight: `active` is
    then False and the owner calls the members one by one again."""

    def __init__(
        self,
        members: list[Linear],
        packed: Packed,
        bias: torch.Tensor | None,
        one_row: OneRowProduct | None = None,
    ) -> None:
        self.members, self.packed, self.bias, self.one_row = members, packed, bias, one_row
        self.out_features = sum(member.out_features for member in members)

    @property
    def active(self) -> bool:
        return self.packed is not None and all(member.fused_into is self for member in self.members)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_product(x, self.packed, self.bias, self.out_features, self.one_row)

    def rows_of(self, member: Linear) -> torch.Tensor:
        """`member`'s own weight, read back from the packed one (a fresh tensor)."""
        return self._split(dense_of(self.packed))[self._index(member)].clone()

    def release(self) -> None:
        """Every member's plain weight back, the packed one dropped."""
        if self.packed is None:
            return
        weights_changed()
        with torch.no_grad():
            for member, rows in zip(self.members, self._split(dense_of(self.packed)), strict=True):
                if member.fused_into is self:
                    member.weight.data = rows.clone()
                    member.fused_into = None
        self.packed = self.bias = self.one_row = None

    def _split(self, dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return dense.split([member.out_features for member in self.members])

    def _index(self, member: Linear) -> int:
        return next(i for i, candidate in enumerate(self.members) if candidate is member)


def in_use(group: FusedLinears | None) -> bool:
    """Whether an owner's group (None: never fused) is the one to call."""
    return group is not None and group.active


def fuse(members: list[Linear], dtypes=None, rows_hint: int | None = DECODE_ROWS_HINT) -> FusedLinears | None:
    """Pack `members` (same input size, dtype and device, all with a bias or none) as one weight
    (`cpu_linear.packed_form`) and free their plain weights; None, changing nothing, where that cannot or should
    not happen. `dtypes`: the weight dtypes to fuse (default: those `cpu_linear.packs_weights` says help here)."""
    if not _fusable(members, dtypes):
        return None
    with torch.no_grad():
        form = packed_form(torch.cat([member.weight.detach() for member in members]), rows_hint)
        if form is None:
            return None
        weights_changed()
        with_bias = members[0].bias is not None
        bias = torch.cat([member.bias.detach() for member in members]) if with_bias else None
        fused = FusedLinears(members, form[0], bias, form[1])
        for member in members:
            member.fused_into = fused
            member.weight.data = member.weight.new_empty(0)
    return fused


def _fusable(members: list[Linear], dtypes) -> bool:
    """Whether the members can and should be packed as one weight (whether their dtype packs here is
    `packed_form`'s to say)."""
    first = members[0].weight
    for member in members:
        weight = member.weight
        if member.packed_weight is not None or member.fused_into is not None or weight.numel() == 0:
            return False
        if weight.device.type != "cpu" or weight.dtype != first.dtype or not weight.is_contiguous():
            return False
        if weight.shape[1] != first.shape[1] or (member.bias is None) != (members[0].bias is None):
            return False
    return first.dtype in dtypes if dtypes is not None else packs_weights(first.dtype)
