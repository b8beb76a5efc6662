"""Mixup and CutMix on training batches, with the NA mask carried through.

Each image mixes with its mirror in the batch (image i with image B-1-i). A mixed label is known only where both
sources are known (`mix_known`), so NA never leaks into a loss through a blend.
"""

import math

import numpy as np
import torch

from .errors import AttrclfError
from .labels import training_counts


def mix_known(mask: torch.Tensor, lam: float) -> torch.Tensor:
    """A mixed entry is known only where both sources are known (a source with weight 0 does not count)."""
    return (mask | (lam == 0.0)) & (mask.flip(0) | (lam == 1.0))


def mixup(pixel_values, targets, mask, lam: float):
    """Each image blended with its mirror in the batch (i with B-1-i): lam * own + (1 - lam) * partner."""
    mixed_pixels = pixel_values * lam + pixel_values.flip(0) * (1.0 - lam)
    return mixed_pixels, targets * lam + targets.flip(0) * (1.0 - lam), mix_known(mask, lam)


def cutmix_box(height: int, width: int, lam: float, rng=np.random) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of area about (1 - lam) * H * W centred uniformly, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randint(0, height), rng.randint(0, width)
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def cutmix(pixel_values, targets, mask, box: tuple[int, int, int, int]):
    """The partner's pixels (i with B-1-i) pasted into `box`; lam is the area left to the image's own pixels.

    Returns:
        (pixels, targets, mask, lam), lam = 1 - box area / image area (from the clipped box, not the drawn lam).
    """
    top, bottom, left, right = box
    height, width = pixel_values.shape[-2:]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    mixed_pixels = pixel_values.clone()
    mixed_pixels[..., top:bottom, left:right] = pixel_values.flip(0)[..., top:bottom, left:right]
    return mixed_pixels, targets * lam + targets.flip(0) * (1.0 - lam), mix_known(mask, lam), lam


def mixing_warnings(mixup_alpha: float, cutmix_alpha: float, labels: list[list[int | None]],
                    na_policy: str = "ignore") -> list[str]:
    """A warning when --mixup / --cutmix would take most known labels out of the loss: a mixed entry is known only
    where both images know it, so a known share k per attribute becomes about k squared. Known as the loss sees it
    (`training_counts`: under --na-policy negative every entry is)."""
    if not (mixup_alpha or cutmix_alpha) or not labels:
        return []
    counts = training_counts(labels, len(labels[0]), na_policy)
    known = 1.0 - np.array(counts.na, dtype=np.float64) / len(labels)  # per attribute
    share, mixed = known.mean(), (known**2).mean()
    if mixed >= 0.8 * share:
        return []
    flags = " / ".join(f for f, on in (("--mixup", mixup_alpha), ("--cutmix", cutmix_alpha)) if on)
    return [f"{flags}: a mixed label is known only where both images' labels are, so with {share:.0%} of the training "
            f"labels known about {mixed:.0%} stay known in a mixed batch and the rest leave the loss (--cutmix 1 "
            f"cost 15 and 57 points of test mAP on the two benchmark sets with a quarter of their labels known: "
            f"benchmarks/README.md); with this many NA, train without mixing"]


class BatchMixer:
    """Mixup / CutMix on training batches (never on validation). With both on, each batch picks one, CutMix with
    probability `switch_prob` (timm's switch).

    Draws from numpy's global generator like timm's Mixup, so `accelerate.utils.set_seed` seeds it and
    accelerate's saved training state restores it.

    Args:
        mixup_alpha: Beta(alpha, alpha) parameter of mixup's lam; 0 turns mixup off.
        cutmix_alpha: Beta(alpha, alpha) parameter of CutMix's lam; 0 turns CutMix off.
        switch_prob: Probability of CutMix when both are on.
        rng: numpy.random or a RandomState (tests).
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, switch_prob: float = 0.5, rng=np.random):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise AttrclfError(f"--mixup and --cutmix must be >= 0 (got {mixup_alpha}, {cutmix_alpha})")
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob, self.rng = mixup_alpha, cutmix_alpha, switch_prob, rng

    def __call__(self, pixel_values, targets, mask):
        """(B, C, H, W) pixels, (B, A) targets and mask -> the mixed batch, same shapes."""
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        if use_cutmix:
            lam = float(self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            box = cutmix_box(*pixel_values.shape[-2:], lam, self.rng)
            return cutmix(pixel_values, targets, mask, box)[:3]
        if self.mixup_alpha > 0:
            return mixup(pixel_values, targets, mask, float(self.rng.beta(self.mixup_alpha, self.mixup_alpha)))
        return pixel_values, targets, mask
