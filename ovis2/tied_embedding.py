"""The token embedding table, read from the tied vocabulary projection's panels once they replace it.

Where the vocabulary projection shares the embedding table (Ovis2-1B to 4B) and the engine lays its bf16 weight
out as `bf16_rows` panels (CPUs without bf16 instructions), the plain table would be held beside the panels: the
vocabulary's rows times the hidden size, 272 MB for the 1B shapes, 467 MB for the 2B. `Embedding.share_panels`
frees it; rows are then read from the panels (an embedding reads a few thousand rows a step at most).
"""

from __future__ import annotations

import torch
from torch import nn

from .bf16_rows import PanelWeight
from .cpu_linear import Linear, weights_changed


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter and state-dict key) that can read its rows from a tied projection's panels
    (`share_panels`). Unpacking the projection gives the plain table back; so do `.to()` and loading a state dict.
    """

    # the tied projection whose panels hold the table, once the table is freed
    projection: Linear | None = None

    def share_panels(self, projection: Linear) -> bool:
        """Free the plain table where `projection` shares it and holds it as panels; False where it does not."""
        if projection.weight is not self.weight or not isinstance(projection.packed_weight, PanelWeight):
            return False
        weights_changed()
        with torch.no_grad():
            self.weight.data = self.weight.new_empty(0)
        # a plain attribute, not a submodule: the projection is the model's, not this table's
        object.__setattr__(self, "projection", projection)
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        panels = self._panels()
        return super().forward(ids) if panels is None else panels.rows(ids)

    def _panels(self) -> PanelWeight | None:
        if self.projection is None or self.weight.numel():
            return None
        packed = self.projection.packed_weight
        return packed if isinstance(packed, PanelWeight) else None

    def _table_back(self) -> None:
        if self.projection is not None:
            self.projection.unpack()  # the shared parameter gets the plain table back
            object.__setattr__(self, "projection", None)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        panels = self._panels()
        if panels is not None:
            destination[prefix + "weight"] = panels.dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._table_back()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._table_back()
        return super()._apply(fn, recurse)
