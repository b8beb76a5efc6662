"""attrclf.augment: mixup / CutMix on hand batches, and the training options end to end.

The NA policy: tests/test_losses.py; the balanced sampler: tests/test_loader.py.
"""

import json

import numpy as np
import pytest
import torch

from attrclf.augment import BatchMixer, cutmix, cutmix_box, mix_known, mixing_warnings, mixup
from attrclf.config import TrainConfig
from attrclf.engine import training_batch
from attrclf.errors import AttrclfError

from .conftest import write_labels_dataset
from .test_train import TINY, run_train


def hand_batch():
    """3 images, each one constant value (0, 10, 20), 4x4 pixels; 2 attributes with some NA."""
    pixel_values = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 10.0, 20.0)])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    return pixel_values, targets, mask


# ---------------------------------------------------------------- mixup / CutMix


def test_mixup_blends_each_image_with_its_mirror_and_keeps_only_entries_known_in_both():
    pixel_values, targets, mask = hand_batch()
    mixed, mixed_targets, mixed_mask = mixup(pixel_values, targets, mask, 0.7)
    # image i pairs with image 2 - i; the middle one pairs with itself
    assert torch.allclose(mixed[:, 0, 0, 0], torch.tensor([0.7 * 0 + 0.3 * 20, 10.0, 0.7 * 20 + 0.3 * 0]))
    assert torch.allclose(mixed_targets, torch.tensor([[0.7, 0.3], [0.0, 0.0], [0.3, 0.7]]))
    assert torch.equal(mixed_mask, torch.tensor([[False, True], [True, False], [False, True]]))


def test_mix_known_ignores_a_source_of_weight_zero():
    mask = torch.tensor([[True, False], [False, False], [True, True]])  # partner of row i is row 2 - i
    assert mix_known(mask, 0.5).tolist() == [[True, False], [False, False], [True, False]]
    assert torch.equal(mix_known(mask, 1.0), mask) and torch.equal(mix_known(mask, 0.0), mask.flip(0))


def test_mixup_with_lam_one_is_the_identity():
    pixel_values, targets, mask = hand_batch()
    mixed, mixed_targets, mixed_mask = mixup(pixel_values, targets, mask, 1.0)
    assert torch.equal(mixed, pixel_values) and torch.equal(mixed_targets, targets) and torch.equal(mixed_mask, mask)


def test_cutmix_pastes_the_partner_into_the_box_and_takes_lam_from_its_area():
    pixel_values, targets, mask = hand_batch()
    mixed, mixed_targets, mixed_mask, lam = cutmix(pixel_values, targets, mask, (1, 3, 0, 2))  # a 2x2 box of 16 px
    assert lam == 1 - 4 / 16
    expected = pixel_values.clone()
    expected[0, :, 1:3, 0:2], expected[2, :, 1:3, 0:2] = 20.0, 0.0
    assert torch.equal(mixed, expected)
    assert torch.allclose(mixed_targets, torch.tensor([[0.75, 0.25], [0.0, 0.0], [0.25, 0.75]]))
    assert torch.equal(mixed_mask, torch.tensor([[False, True], [True, False], [False, True]]))
    _, _, same_mask, lam_one = cutmix(pixel_values, targets, mask, (2, 2, 0, 4))  # empty box
    assert lam_one == 1.0 and torch.equal(same_mask, mask)


class FixedCentre:
    """Stands in for numpy's generator: the box centre is always (cy, cx)."""

    def __init__(self, cy, cx):
        self.centre = [cy, cx]

    def randint(self, low, high):
        return self.centre.pop(0)


def test_cutmix_box_size_and_clipping():
    # lam 0.75: side sqrt(0.25) * 10 = 5, half-sides truncate to 2 like timm's rand_bbox
    assert cutmix_box(10, 10, 0.75, FixedCentre(5, 5)) == (3, 7, 3, 7)
    assert cutmix_box(10, 10, 0.75, FixedCentre(0, 9)) == (0, 2, 7, 10)  # clipped at the edges
    assert cutmix_box(10, 10, 1.0, FixedCentre(5, 5)) == (5, 5, 5, 5)  # lam 1: empty


def test_batch_mixer_with_both_picks_each_about_half_the_time():
    pixel_values, targets, mask = hand_batch()
    mixer = BatchMixer(mixup_alpha=0.4, cutmix_alpha=1.0, rng=np.random.RandomState(0))
    kinds = []
    for _ in range(200):
        mixed, _, _ = mixer(pixel_values, targets, mask)
        # CutMix leaves image 0 made of only 0 and 20; mixup gives values strictly between them everywhere
        kinds.append("cutmix" if set(mixed[0].unique().tolist()) <= {0.0, 20.0} else "mixup")
    assert 70 <= kinds.count("cutmix") <= 130
    with pytest.raises(AttrclfError, match="--mixup and --cutmix must be >= 0"):
        BatchMixer(mixup_alpha=-0.1)
    off = BatchMixer(0.0, 0.0)(pixel_values, targets, mask)
    assert all(torch.equal(a, b) for a, b in zip(off, (pixel_values, targets, mask), strict=True))


def test_training_batch_applies_na_policy_before_mixing():
    pixel_values, targets, mask = hand_batch()
    cfg = TrainConfig(na_policy="negative", mixup=0.4)
    np.random.seed(0)
    _, mixed_targets, mixed_mask = training_batch(cfg)(pixel_values, targets, mask)
    assert mixed_mask.all()  # every entry known after "negative", so every mixed entry is known
    lam = mixed_targets[0, 0].item()  # image 0: lam * 1 + (1 - lam) * 0
    assert 0 < lam < 1 and torch.allclose(mixed_targets, torch.tensor([[lam, 1 - lam], [0, 0], [1 - lam, lam]]))


def test_bad_mixing_and_policy_flags_are_clear_errors():
    with pytest.raises(AttrclfError, match="--mixup and --cutmix"):
        TrainConfig(mixup=-1).resolve()
    with pytest.raises(AttrclfError, match="--na-policy"):
        TrainConfig(na_policy="maybe").resolve()
    with pytest.raises(AttrclfError, match="clip"):
        TrainConfig(loss="asl", asl_clip=2.0).resolve()


# ---------------------------------------------------------------- from the command line


@pytest.mark.slow
def test_training_options_from_accelerate_launch(tmp_path):
    # attribute "rare": 1 in 6 positive; "patchy": NA on every third image
    lines = ["img rare patchy"] + [f"i{n:02d}.png {int(n % 6 == 0)} {'NA' if n % 3 == 0 else n % 2}" for n in range(48)]
    data = write_labels_dataset(tmp_path / "d", lines)
    out = tmp_path / "o"
    result = run_train(["--data", str(data), "--no-pretrained", *TINY, "--epochs", "2", "--loss", "asl",
                        "--asl-gamma-neg", "2", "--na-policy", "negative", "--mixup", "0.4", "--cutmix", "1.0",
                        "--balanced-sampler", "--output-dir", str(out)], tmp_path, launcher=("accelerate",))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    saved = json.loads((out / "train_config.json").read_text())
    assert {k: saved[k] for k in ("loss", "asl_gamma_neg", "na_policy", "mixup", "cutmix", "balanced_sampler")} == {
        "loss": "asl", "asl_gamma_neg": 2.0, "na_policy": "negative", "mixup": 0.4, "cutmix": 1.0,
        "balanced_sampler": True}
    metrics = json.loads((out / "metrics.json").read_text())
    train = metrics["data"]["train_counts"]["patchy"]
    # --na-policy negative: pos_weight counts NA as negatives ...
    assert metrics["pos_weight"]["patchy"] == pytest.approx((train["negative"] + train["na"]) / train["positive"],
                                                            abs=1e-4)
    # ... but validation metrics still skip NA
    validation = metrics["data"]["validation_counts"]["patchy"]
    row = metrics["validation"]["per_attribute"]["patchy"]
    assert validation["na"] > 0 and (row["positives"], row["negatives"], row["na"]) == (
        validation["positive"], validation["negative"], validation["na"])


def test_mixing_on_labels_with_many_na_is_named_in_a_warning_with_the_known_share_it_leaves():
    half = [[1, None], [None, 0], [0, None], [None, 1]]  # every attribute known on half the images
    (message,) = mixing_warnings(0.0, 1.0, half)
    assert message.startswith("--cutmix: a mixed label is known only where both images' labels are, so with 50% of "
                              "the training labels known about 25% stay known in a mixed batch")
    assert mixing_warnings(0.2, 1.0, half)[0].startswith("--mixup / --cutmix: ")
    assert mixing_warnings(0.0, 0.0, half) == []  # no mixing
    mostly_known = [[1, 0]] * 9 + [[None, 0]]  # 95% known: 0.95 vs 0.905 mixed, within the 0.8 ratio
    assert mixing_warnings(0.2, 0.0, mostly_known) == []
    assert mixing_warnings(0.0, 1.0, half, "negative") == []  # NA trains as absent: every entry is known
