"""Losses over known labels only: NA entries (mask False) add nothing to the value or the gradients."""

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AttrclfError


class MaskedBCEWithLogits(nn.Module):
    """BCE-with-logits with per-attribute pos_weight, averaged over the known entries of the batch."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight.float() if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """logits, targets (B, A); mask (B, A) bool, True where the label is known. Returns a scalar."""
        per_entry = F.binary_cross_entropy_with_logits(
            logits.float(), targets.float(), pos_weight=self.pos_weight, reduction="none"
        )
        # where(), not a multiplication: an NA entry must not pass even a NaN or inf to the gradient
        per_entry = torch.where(mask, per_entry, torch.zeros_like(per_entry))
        return per_entry.sum() / mask.sum().clamp(min=1)


LOSSES = {"bce": MaskedBCEWithLogits}


def build_loss(name: str, pos_weight: torch.Tensor | None = None) -> nn.Module:
    """The loss called `name` ("bce")."""
    if name not in LOSSES:
        raise AttrclfError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](pos_weight=pos_weight)
