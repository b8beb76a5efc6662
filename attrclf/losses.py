"""Losses over known labels only: NA entries (mask False) add nothing to the value or the gradients.

Every loss takes (B, A) logits, (B, A) targets in [0, 1] (soft after mixup) and a (B, A) bool mask, True where the
label is known, and returns the mean over the known entries (`--loss-average attributes`: each attribute's mean over
its known entries, then the mean over the attributes); with an optional (B, A) per-entry `weight` it returns the
weighted mean over them instead, sum(weight * loss) / sum(weight) (the pseudo-labels of `--na-policy pseudo` weigh
less than the known labels, which weigh 1). pos_weight (A,) multiplies the positive term of each attribute in every
loss. ASL and focal loss already rebalance easy negatives, so with them you may want `--pos-weight-cap 1` (every
pos_weight 1). The NA policy decides, for training batches only, whether NA stays out of the loss ("ignore"), counts
as a negative ("negative", `apply_na_policy`), is pseudo-labelled where the model is confident ("pseudo",
`PseudoLabeller`, after the forward pass), counts as a down-weighted negative where the attribute is rare and the
model does not find it likely ("selective", `SelectiveNegatives`, after the forward pass), or takes the weight
average's probability as a soft target ("teacher", `TeacherTargets`, a mean teacher), or is labelled where the model
is confident on the training view and that label is learnt on a strongly augmented view of the same image ("fixmatch",
`ViewPseudoLabels`, a loss term of its own).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AttrclfError

# what training does with NA: leave it out of the loss, call it 0, pseudo-label the confident ones, call it a
# weighted 0 where the attribute is rare and the model finds it unlikely, let the weight average label it softly, or
# label it where the model is confident on one view of the image and train that label on a stronger view
NA_POLICIES = ("ignore", "negative", "pseudo", "selective", "teacher", "fixmatch")
# how a batch's per-entry losses become one number: the mean over its known entries, or over its attributes (each
# attribute's mean over its known entries): see masked_mean
LOSS_AVERAGES = ("entries", "attributes")


def apply_na_policy(targets: torch.Tensor, mask: torch.Tensor, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets and mask under --na-policy: "ignore" leaves NA out of the loss; "negative" counts it as 0;
    "pseudo", "selective", "teacher" and "fixmatch" leave it out here, as "ignore" does (their labels need a model's
    output: see PseudoLabeller, SelectiveNegatives, TeacherTargets and ViewPseudoLabels).

    Only training batches go through this: validation metrics and threshold tuning always skip NA.
    """
    if policy in ("ignore", "pseudo", "selective", "teacher", "fixmatch"):
        return targets, mask
    if policy == "negative":
        return torch.where(mask, targets, torch.zeros_like(targets)), torch.ones_like(mask)
    raise AttrclfError(f"unknown --na-policy '{policy}'; choose one of: {', '.join(NA_POLICIES)}")


def known_only(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets with NA entries replaced by 0 before any arithmetic.

    torch.where passes a zero gradient to the entries it does not select, without multiplying by them, so an inf or
    NaN logit (or target) under NA cannot turn the gradient into NaN.
    """
    return (torch.where(mask, logits.float(), torch.zeros_like(logits, dtype=torch.float32)),
            torch.where(mask, targets.float(), torch.zeros_like(targets, dtype=torch.float32)))


def check_average(average: str) -> str:
    """`average` if it is one of LOSS_AVERAGES, else a clear error."""
    if average not in LOSS_AVERAGES:
        raise AttrclfError(f"unknown loss average '{average}'; choose one of: {', '.join(LOSS_AVERAGES)}")
    return average


def masked_mean(per_entry: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None,
                average: str = "entries") -> torch.Tensor:
    """Mean of (B, A) per-entry losses over the known entries; 0 when none is known.

    With a (B, A) `weight`, the weighted mean over the known entries: sum(weight * loss) / sum(weight).
    `average` "attributes" takes that mean per attribute (column) first, then the mean over the attributes with a
    known entry in the batch: each attribute then weighs the same in the gradient however many of its labels are
    known, and labels added to one attribute (pseudo-labels) do not dilute the others.
    """
    check_average(average)
    per_entry = torch.where(mask, per_entry, torch.zeros_like(per_entry))
    weight = mask.to(per_entry.dtype) if weight is None else torch.where(mask, weight.to(per_entry.dtype),
                                                                          torch.zeros_like(per_entry))
    if average == "attributes":
        totals = weight.sum(0)
        present = totals > 0
        means = (per_entry * weight).sum(0) / torch.where(present, totals, torch.ones_like(totals))
        return means.sum() / present.sum().clamp(min=1)
    total = weight.sum()
    return (per_entry * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))


class MaskedBCEWithLogits(nn.Module):
    """BCE-with-logits with per-attribute pos_weight, averaged over the known entries of the batch."""

    def __init__(self, pos_weight: torch.Tensor | None = None, average: str = "entries"):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight.float() if pos_weight is not None else None)
        self.average = check_average(average)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """logits, targets (B, A); mask (B, A) bool, True where the label is known; optional (B, A) per-entry weight
        (see masked_mean). Returns a scalar."""
        logits, targets = known_only(logits, targets, mask)
        per_entry = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")
        return masked_mean(per_entry, mask, weight, self.average)


def _focusing(base: torch.Tensor, gamma: float, detach: bool) -> torch.Tensor | float:
    """base ** gamma (1 when gamma is 0, so that no 0 * inf reaches the gradient); detached if asked."""
    if gamma == 0:
        return 1.0
    # the floor keeps d(base^gamma)/d(base) finite for gamma < 1 where base is exactly 0
    weight = base.clamp(min=1e-12).pow(gamma)
    return weight.detach() if detach else weight


class AsymmetricLoss(nn.Module):
    """ASL (Ridnik et al., 2021): focal weights with separate exponents for positives and negatives, and a
    probability margin `clip` that discards very easy negatives.

    Per known entry, with p = sigmoid(logit), p_m = max(p - clip, 0) and target y in [0, 1]:
        loss = -(pos_weight * y * (1 - p)^gamma_pos * log(p) + (1 - y) * p_m^gamma_neg * log(1 - p_m))
    For hard targets this is the paper's loss; soft (mixed) targets weigh the two terms linearly. With both gammas 0
    and clip 0 it equals masked BCE.

    Args:
        pos_weight: (A,) weight of the positive term per attribute, or None.
        gamma_neg: Focusing exponent of negatives (paper: 4).
        gamma_pos: Focusing exponent of positives (paper: 0).
        clip: Probability margin on negatives (paper: 0.05).
        detach_focal_weight: Treat the focusing weights as constants in the gradient, as the ASL repository's
            training script does (`disable_torch_grad_focal_loss`); the default differentiates through them, as the
            paper's gradient analysis does. Done with detach(), never with a global grad switch.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                 clip: float = 0.05, *, detach_focal_weight: bool = False, average: str = "entries"):
        super().__init__()
        self.average = check_average(average)
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
            raise AttrclfError(f"ASL needs gammas >= 0 and 0 <= clip < 1 (got gamma_neg={gamma_neg}, "
                               f"gamma_pos={gamma_pos}, clip={clip})")
        self.register_buffer("pos_weight", pos_weight.float() if pos_weight is not None else None)
        self.gamma_neg, self.gamma_pos, self.clip = float(gamma_neg), float(gamma_pos), float(clip)
        self.detach_focal_weight = detach_focal_weight

    def terms(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) positive and negative terms of the loss, each >= 0, before masking."""
        log_p = F.logsigmoid(logits)
        if self.clip > 0:
            q_m = (torch.sigmoid(-logits) + self.clip).clamp(max=1.0)  # 1 - p_m, >= clip so its log is finite
            log_q, p_m = torch.log(q_m), 1.0 - q_m
        else:
            log_q, p_m = F.logsigmoid(-logits), torch.sigmoid(logits)
        positive = -targets * _focusing(torch.sigmoid(-logits), self.gamma_pos, self.detach_focal_weight) * log_p
        negative = -(1 - targets) * _focusing(p_m, self.gamma_neg, self.detach_focal_weight) * log_q
        if self.pos_weight is not None:
            positive = positive * self.pos_weight
        return positive, negative

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """logits, targets (B, A); mask (B, A) bool, True where the label is known; optional (B, A) per-entry weight
        (see masked_mean). Returns a scalar."""
        logits, targets = known_only(logits, targets, mask)
        positive, negative = self.terms(logits, targets)
        return masked_mean(positive + negative, mask, weight, self.average)


class FocalLoss(AsymmetricLoss):
    """Focal loss (Lin et al., 2017) over known entries: ASL with gamma_pos = gamma_neg = gamma and no clip.

    loss = -(alpha * pos_weight * y * (1 - p)^gamma * log(p) + (1 - alpha) * (1 - y) * p^gamma * log(1 - p)),
    with alpha left out (both terms weighted 1) when it is None. With gamma 0 and no alpha it equals masked BCE.

    Args:
        pos_weight: (A,) weight of the positive term per attribute, or None.
        gamma: Focusing exponent (paper: 2).
        alpha: Weight of positives in [0, 1] (negatives get 1 - alpha), or None.
        detach_focal_weight: As in AsymmetricLoss.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None, gamma: float = 2.0, alpha: float | None = None,
                 detach_focal_weight: bool = False, average: str = "entries"):
        if alpha is not None and not 0 <= alpha <= 1:
            raise AttrclfError(f"focal loss alpha must be between 0 and 1 (got {alpha})")
        super().__init__(pos_weight, gamma_neg=gamma, gamma_pos=gamma, clip=0.0,
                         detach_focal_weight=detach_focal_weight, average=average)
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        logits, targets = known_only(logits, targets, mask)
        positive, negative = self.terms(logits, targets)
        if self.alpha is not None:
            positive, negative = self.alpha * positive, (1 - self.alpha) * negative
        return masked_mean(positive + negative, mask, weight, self.average)


# ---------------------------------------------------------------- --na-policy pseudo


def unweighted_probs(logits: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    """(B, A) probabilities with the loss's pos_weight taken out: sigmoid(logit - log w).

    A loss whose positive term is weighted by w (A,) is smallest where the model outputs w q / (w q + 1 - q) for an
    entry that is positive with probability q, so its sigmoid overstates q wherever w > 1 (w 25 and q 0.43 give 0.95).
    Shifting the logit by log w gives q back: the probability to compare with a confidence threshold, and the soft
    target at which the weighted loss is smallest (w q' / (w q' + 1 - q') = p for q' = p / (p + w (1 - p))).
    """
    logits = logits.detach().float()
    if pos_weight is None:
        return torch.sigmoid(logits)
    return torch.sigmoid(logits - torch.log(pos_weight.to(logits.device).float()).unsqueeze(0))


@dataclass
class PseudoLabeller:
    """Online curriculum pseudo-labelling of NA entries (after Durand et al., CVPR 2019, "Learning a Deep ConvNet for
    Multi-label Classification with Partial Labels"): a growing share of the missing labels is filled in with the
    model's own most confident predictions.

    Online: no extra pass over the data. In a training step, an NA entry whose detached probability is <= `low` joins
    the loss as a pseudo-negative and one >= `high` as a pseudo-positive, with weight `weight` (known labels weigh 1).
    The probability is the model's with the loss's `pos_weight` taken out (`unweighted_probs`): the raw sigmoid of a
    model trained with pos_weight w calls an entry with a 43% chance of being present 95% sure at w 25, and those
    entries would become pseudo-positives.
    Known entries are never changed. The curriculum (`for_epoch`) relaxes the thresholds epoch by epoch. Training
    batches only: validation, the best epoch, the thresholds and the label counts see the real labels.

    Attributes:
        low: Probability at or below which an NA entry becomes a pseudo-negative.
        high: Probability at or above which an NA entry becomes a pseudo-positive.
        weight: Loss weight of a pseudo-label.
        pos_weight: (A,) the loss's positive weights, or None.
        positives: Pseudo-positives made so far (this process).
        negatives: Pseudo-negatives made so far (this process).
    """

    low: float
    high: float
    weight: float
    pos_weight: torch.Tensor | None = None
    positives: int = 0
    negatives: int = 0

    @classmethod
    def for_epoch(cls, epoch: int, epochs: int, *, low: float, high: float, weight: float,
                  pos_weight: torch.Tensor | None = None) -> "PseudoLabeller":
        """The labeller of the `epoch`-th (0-based) of `epochs` curriculum epochs.

        The thresholds start strict and relax linearly to (low, high): with f = (epoch + 1) / epochs, an NA entry is
        pseudo-labelled at p <= low * f or p >= 1 - (1 - high) * f. The first epoch of 4 with the defaults admits
        p <= 0.0125 and p >= 0.9875, the last p <= 0.05 and p >= 0.95.
        """
        share = min(1.0, (epoch + 1) / max(epochs, 1))
        return cls(low=low * share, high=1.0 - (1.0 - high) * share, weight=weight, pos_weight=pos_weight)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, A) logits, targets and bool mask -> targets, mask and per-entry weight with the pseudo-labels added.

        Only entries with mask False can change; the logits are detached (a pseudo-label is a target, not a path
        for gradients). An entry whose probability is NaN stays NA.
        """
        probs = unweighted_probs(logits, self.pos_weight)
        negative = ~mask & (probs <= self.low)
        positive = ~mask & (probs >= self.high)
        pseudo = negative | positive
        targets = torch.where(positive, torch.ones_like(targets), torch.where(negative, torch.zeros_like(targets),
                                                                               targets))
        weight = torch.where(pseudo, torch.full_like(probs, self.weight), torch.ones_like(probs))
        self.positives += int(positive.sum())
        self.negatives += int(negative.sum())
        return targets, mask | pseudo, weight

    def tallies(self) -> list[int]:
        """This process's counts, summed over processes for `summary`."""
        return [self.negatives, self.positives]

    def summary(self, tallies: list[int]) -> str:
        """The epoch's log line from the counts of every process."""
        return (f"  pseudo-labels this epoch: {tallies[0]} negative(s) at p <= {self.low:.4f}, {tallies[1]} "
                f"positive(s) at p >= {self.high:.4f} (NA entries of training batches, weight {self.weight:g})")


# ---------------------------------------------------------------- --na-policy selective


@dataclass
class SelectiveNegatives:
    """Selective negatives for NA entries, after CSL (Ben-Baruch et al., CVPR 2022, "Multi-label Classification with
    Partial Annotations using Class-aware Selective Loss"): an un-annotated label is most often absent, so calling it
    a negative adds real information, except where it is likely present. Two signals say "likely present": the
    attribute's prior (its positive share among the known labels of the training split) and the label's likelihood
    (the model's own detached probability in this step).

    In a training step, an NA entry of attribute a becomes a negative with loss weight `weight` when
    prior[a] <= `max_prior` and its probability is below `likely`; every other NA entry stays out of the loss. With
    pos_weight (negatives / positives of the known labels) the probabilities are balanced around 0.5, so `likely`
    0.5 ignores what the model would itself call present. Known entries never change; training batches only.

    Attributes:
        priors: (A,) positive share of the known training labels per attribute.
        max_prior: Attributes with a larger prior keep their NA entries out of the loss.
        likely: Probability at or above which an NA entry is left out as likely present.
        weight: Loss weight of a selective negative (a known label weighs 1).
        negatives: Selective negatives made so far (this process).
        ignored: NA entries left out so far (this process).
    """

    priors: torch.Tensor
    max_prior: float
    likely: float
    weight: float
    negatives: int = 0
    ignored: int = 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, A) logits, targets and bool mask -> targets, mask and per-entry weight with the selective negatives.

        The logits are detached (the choice is a target, not a path for gradients); a NaN probability stays NA.
        """
        probs = torch.sigmoid(logits.detach().float())
        rare = (self.priors.to(probs.device) <= self.max_prior).unsqueeze(0)
        negative = ~mask & rare & (probs < self.likely)
        targets = torch.where(negative, torch.zeros_like(targets), targets)
        weight = torch.where(negative, torch.full_like(probs, self.weight), torch.ones_like(probs))
        self.negatives += int(negative.sum())
        self.ignored += int((~mask).sum()) - int(negative.sum())
        return targets, mask | negative, weight

    def tallies(self) -> list[int]:
        """This process's counts, summed over processes for `summary`."""
        return [self.negatives, self.ignored]

    def summary(self, tallies: list[int]) -> str:
        """The epoch's log line from the counts of every process."""
        return (f"  selective NA this epoch: {tallies[0]} counted as negative (weight {self.weight:g}), "
                f"{tallies[1]} left out (a common attribute, or p >= {self.likely:g})")


# ---------------------------------------------------------------- --na-policy teacher


@dataclass
class TeacherTargets:
    """Soft targets for NA entries from a mean teacher (Tarvainen & Valpola, NeurIPS 2017, "Mean teachers are better
    role models"): the exponential moving average of the weights (attrclf.ema), run on the same training batch,
    labels what the annotation left open, and the student learns to agree with it there.

    In a training step, every NA entry joins the loss with the teacher's probability p as its target and the weight
    `weight` * |2p - 1|: a confident teacher counts, an undecided one (p near 0.5) adds almost nothing. Soft targets,
    not thresholded ones: the teacher's calibration, not a cut-off, says how sure it is. Known entries never change
    and always weigh 1; training batches only (validation, the best epoch, the thresholds and the label counts see
    the real labels). The teacher is an average of past students, so it changes slowly and does not chase the
    student's own mistakes, the failure of a model labelling for itself.

    With `pos_weight` w (the loss's, which multiplies the positive term), the target is p / (p + w (1 - p)): the
    weighted BCE is smallest where the student outputs p itself. Without it, the student would learn w p / (w p +
    1 - p) > p there, the teacher would follow, and every NA entry would drift towards positive.

    Attributes:
        weight: Loss weight of an NA entry whose teacher probability is 0 or 1 (a known label weighs 1).
        pos_weight: (A,) the loss's positive weights, or None.
        labelled: NA entries given a soft target so far (this process).
        confidence: Sum of their |2p - 1| so far (this process), for the log's mean confidence.
    """

    weight: float
    pos_weight: torch.Tensor | None = None
    labelled: int = 0
    confidence: float = 0.0

    def __call__(self, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, A) teacher logits, targets and bool mask -> targets, mask and per-entry weight with the NA entries
        softly labelled. A NaN teacher probability stays NA."""
        probs = torch.sigmoid(teacher_logits.detach().float())
        labelled = ~mask & torch.isfinite(probs)
        certainty = (2 * probs - 1).abs()
        soft = unweighted_probs(teacher_logits, self.pos_weight)  # = p / (p + w (1 - p))
        targets = torch.where(labelled, soft.to(targets.dtype), targets)
        weight = torch.where(labelled, self.weight * certainty, torch.ones_like(probs))
        self.labelled += int(labelled.sum())
        self.confidence += float(torch.where(labelled, certainty, torch.zeros_like(certainty)).sum())
        return targets, mask | labelled, weight

    def tallies(self) -> list[float]:
        """This process's count and certainty sum, summed over processes for `summary`."""
        return [float(self.labelled), self.confidence]

    def summary(self, tallies: list[float]) -> str:
        """The epoch's log line from the tallies of every process."""
        labelled, confidence = tallies
        return (f"  teacher NA this epoch: {int(labelled)} soft target(s), mean certainty "
                f"{confidence / max(labelled, 1):.3f} (weight {self.weight:g} x certainty)")


# ---------------------------------------------------------------- --na-policy fixmatch


@dataclass
class ViewPseudoLabels:
    """Pseudo-labels across two views, after FixMatch (Sohn et al., NeurIPS 2020, "FixMatch: Simplifying
    Semi-Supervised Learning with Consistency and Confidence") applied entry by entry to partial multilabel annotations.

    Each training image comes as two views: the usual augmentation (weak) and a stronger one of the same image
    (`device_augment.strong_view`). Known labels train on the weak view as always. An NA entry whose detached
    probability on the weak view (with the loss's `pos_weight` taken out, `unweighted_probs`) is at least `threshold`
    becomes a pseudo-positive (with `negatives_too`, one at most 1 - `threshold` a pseudo-negative; by default not:
    positives are what a partially labelled rare attribute lacks, and pseudo-positives alone did better on both
    benchmark sets), and that label is learnt on the STRONG view:
    a confident guess adds a gradient only where the model does not yet give the same answer on another view of the
    image, so it teaches invariance instead of repeating what the model already says (the weakness of labelling the
    very view one trains on). The term is FixMatch's: the loss over the pseudo-labelled entries divided by the number
    of NA entries in the batch (an unconfident entry counts as 0), times `weight`; so it does not dilute the known
    labels' mean, and its size follows the share of NA entries the model is sure of.

    Training batches only: validation, the best epoch, the thresholds and the label counts see the real labels.

    Attributes:
        threshold: Unweighted probability on the weak view at which an NA entry is pseudo-labelled (> 0.5).
        weight: Weight of the term beside the known labels' mean (FixMatch's lambda_u).
        pos_weight: (A,) the loss's positive weights, or None.
        negatives_too: Also make pseudo-negatives (at most 1 - threshold); False: pseudo-positives only.
        weigh_positives: The loss's pos_weight multiplies a pseudo-positive as it does a known positive; False: a
            pseudo-positive weighs 1 (a wrong one then costs no more than a wrong negative).
        positives: Pseudo-positives made so far (this process).
        negatives: Pseudo-negatives made so far (this process).
    """

    threshold: float
    weight: float
    pos_weight: torch.Tensor | None = None
    negatives_too: bool = False
    weigh_positives: bool = False
    positives: int = 0
    negatives: int = 0

    def labels(self, weak_logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) weak-view logits and known-label mask -> pseudo targets and the bool mask of pseudo-labelled
        entries (NA entries only; a NaN probability stays out)."""
        probs = unweighted_probs(weak_logits, self.pos_weight)
        positive = ~mask & (probs >= self.threshold)
        negative = ~mask & (probs <= 1.0 - self.threshold) if self.negatives_too else torch.zeros_like(mask)
        self.positives += int(positive.sum())
        self.negatives += int(negative.sum())
        return positive.to(weak_logits.dtype), positive | negative

    def term(self, loss_fn: nn.Module, weak_logits: torch.Tensor, strong_logits: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """The loss term of the NA entries: `weight` x (sum of `loss_fn`'s per-entry loss on the strong view over the
        pseudo-labelled entries) / (NA entries in the batch); 0 (with a gradient path) when the batch has none."""
        targets, pseudo = self.labels(weak_logits, mask)
        count = int(pseudo.sum())
        if count == 0:
            return strong_logits.sum() * 0.0
        missing = int((~mask).sum())
        entry_weight = None
        if not self.weigh_positives and self.pos_weight is not None:  # pos_weight x 1 / pos_weight = 1
            entry_weight = torch.where(targets > 0, 1.0 / self.pos_weight.to(targets.device).float().unsqueeze(0),
                                       torch.ones_like(targets))
            count = float(torch.where(pseudo, entry_weight, torch.zeros_like(entry_weight)).sum())
        return self.weight * loss_fn(strong_logits, targets, pseudo, entry_weight) * (count / missing)

    def tallies(self) -> list[int]:
        """This process's counts, summed over processes for `summary`."""
        return [self.negatives, self.positives]

    def summary(self, tallies: list[int]) -> str:
        """The epoch's log line from the counts of every process."""
        return (f"  fixmatch NA this epoch: {tallies[1]} positive(s) and {tallies[0]} negative(s) sure at "
                f"{self.threshold:g} on the weak view, learnt on the strong view (term weight {self.weight:g})")


LOSSES = {"bce": MaskedBCEWithLogits, "asl": AsymmetricLoss, "focal": FocalLoss}


def build_loss(name: str, pos_weight: torch.Tensor | None = None, **options) -> nn.Module:
    """The loss called `name` ("bce", "asl" or "focal"); `options` go to its constructor (e.g. gamma_neg, clip)."""
    if name not in LOSSES:
        raise AttrclfError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](pos_weight=pos_weight, **options)
