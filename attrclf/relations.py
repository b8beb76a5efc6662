"""Relations between attributes, mined from the training labels, and the NA entries they decide (--label-relations).

Two kinds of relation are read off the training images where both attributes are known: "a implies b" (no image
has a present and b absent) and "a excludes b" (no image has both present). Zero counter-examples alone is weak
evidence when b is rare or a has few positives, so a relation is kept only where, were the two attributes unrelated,
a's known positives would show at least `min_evidence` counter-examples (b's positive share times a's positives for
an exclusion, its negative share for an implication), and a has at least MIN_SUPPORT such positives. These are the
subsumption and exclusion edges of a HEX graph (Deng et al., ECCV 2014), learnt from the data instead of given.

A kept relation decides an NA entry from a GIVEN label of the same image, in either direction: "a implies b" sets
b present where a is present and a absent where b is absent; "a excludes b" sets b absent where a is present and a
absent where b is present. Decided entries only come from given labels (no chains), and an entry two relations decide
differently stays NA. The decided entries join the training loss as known labels; validation, thresholds, metrics
and metrics.json's label counts keep the given labels only.
"""

from dataclasses import dataclass, replace

import numpy as np

from .errors import AttrclfError

MIN_SUPPORT = 10  # known positives of the premise, at least, behind any relation


@dataclass(frozen=True)
class Relation:
    """`premise` present => `conclusion` present (implies=True) or absent (implies=False), by attribute index."""

    premise: int
    conclusion: int
    implies: bool
    support: int  # training images with the premise present and the conclusion known

    def describe(self, names: list[str]) -> str:
        verb = "implies" if self.implies else "excludes"
        return f"'{names[self.premise]}' {verb} '{names[self.conclusion]}' ({self.support} images)"


def label_matrix(labels: list[list[int | None]], num_labels: int) -> np.ndarray:
    """(N, A) float array of 1 / 0 with NaN for NA."""
    matrix = np.array([[np.nan if v is None else float(v) for v in row] for row in labels], dtype=np.float64)
    return matrix.reshape(len(labels), num_labels)


def pair_counts(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[a, b] = number of rows where first[:, a] and second[:, b] are both true."""
    return first.astype(np.float64).T @ second.astype(np.float64)


def mine_relations(labels: np.ndarray, min_evidence: float, min_support: int = MIN_SUPPORT) -> list[Relation]:
    """The implications and exclusions that the known entries of `labels` (N, A; NaN = NA) support (module doc)."""
    if not min_evidence > 0:
        raise AttrclfError(f"--relation-evidence must be > 0 (got {min_evidence:g})")
    known, present, absent = ~np.isnan(labels), labels == 1, labels == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(present.sum(0) / known.sum(0))  # positive share of each attribute's known entries
    support = pair_counts(present, known)  # [a, b]: images with a present and b known
    both_present = pair_counts(present, present)
    a_present_b_absent = pair_counts(present, absent)
    relations = []
    for a in range(labels.shape[1]):
        for b in range(labels.shape[1]):
            n = int(support[a, b])
            if a == b or n < min_support:
                continue
            if a_present_b_absent[a, b] == 0 and n * (1 - share[b]) >= min_evidence:
                relations.append(Relation(a, b, True, n))
            if both_present[a, b] == 0 and n * share[b] >= min_evidence:
                relations.append(Relation(a, b, False, n))
    return relations


def apply_relations(labels: np.ndarray, relations: list[Relation]) -> np.ndarray:
    """A copy of `labels` with the NA entries that the relations decide from given labels filled in."""
    votes_present, votes_absent = np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
    for r in relations:
        a, b = r.premise, r.conclusion
        if r.implies:  # a present => b present; b absent => a absent
            votes_present[labels[:, a] == 1, b] = True
            votes_absent[labels[:, b] == 0, a] = True
        else:  # a present => b absent; b present => a absent
            votes_absent[labels[:, a] == 1, b] = True
            votes_absent[labels[:, b] == 1, a] = True
    filled = labels.copy()
    na = np.isnan(labels)
    filled[na & votes_present & ~votes_absent] = 1.0
    filled[na & votes_absent & ~votes_present] = 0.0
    return filled


def complete_training_labels(data, min_evidence: float):
    """`data` with its TRAINING labels completed by the relations mined from them, and a report for metrics.json.

    Returns:
        (AttrData, report): report = {"min_evidence", "relations": [text], "given_known", "filled": {name:
        {"present", "absent"}}, "filled_total"}.
    """
    names = data.label_names
    given = label_matrix(data.train["labels"], len(names))
    relations = mine_relations(given, min_evidence)
    filled = apply_relations(given, relations)
    new = np.isnan(given) & ~np.isnan(filled)
    rows = [[None if np.isnan(v) else int(v) for v in row] for row in filled]
    train = data.train.remove_columns("labels").add_column("labels", rows,
                                                             feature=data.train.features["labels"])
    report = {"min_evidence": min_evidence, "relations": [r.describe(names) for r in relations],
              "given_known": int((~np.isnan(given)).sum()),
              "filled": {name: {"present": int((new[:, j] & (filled[:, j] == 1)).sum()),
                                "absent": int((new[:, j] & (filled[:, j] == 0)).sum())}
                         for j, name in enumerate(names)},
              "filled_total": int(new.sum())}
    return replace(data, train=train), report


def describe_report(report: dict) -> str:
    """One line for the training log."""
    if not report["relations"]:
        return ("label relations: none found in the training labels (--relation-evidence "
                f"{report['min_evidence']:g}); no NA entry filled")
    shown = "; ".join(report["relations"][:4]) + ("; ..." if len(report["relations"]) > 4 else "")
    share = report["filled_total"] / max(1, report["given_known"])
    return (f"label relations: {len(report['relations'])} found ({shown}); they decide {report['filled_total']} NA "
            f"training entries ({share:.0%} more known labels), which the loss counts as known (validation, "
            "thresholds and metrics keep the given labels)")
