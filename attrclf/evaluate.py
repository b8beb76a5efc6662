"""Scoring a trained model on a labelled test set: `attrclf evaluate --model M --data TEST [--output DIR]`.

TEST is anything `--data` accepts in training (a labels.txt folder, an image folder with metadata, a saved or Hub
dataset). The probabilities come from Predictor (the same preprocessing as `attrclf predict`); every metric skips NA
(attrclf.metrics). The test set may label a subset of the model's attributes; a name the model does not know is an
error. Images that fail to decode are listed and counted, and the rest are scored.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__
from .errors import AttrclfError, run_cli
from .fileio import write_each
from .metrics import average_precision, confusion, f1_summary
from .predict import Predictor, add_backend_argument

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class TestSet:
    """A labelled test split as evaluate reads it.

    Attributes:
        label_names: The attribute names the test set labels, in its column order.
        images: One image source per row (a path, bytes or a `datasets` image dict).
        image_names: A name per row, for reports.
        labels: (N, len(label_names)) rows of 1, 0 or None (NA).
        description: Where it came from, for the report.
    """

    label_names: list[str]
    images: list
    image_names: list[str]
    labels: list[list[int | None]]
    description: str


@dataclass
class AttributeScore:
    """One attribute's scores over its known test labels.

    `support` is the number of known positives (scikit-learn's meaning); `evaluated` is False when the known labels
    hold a single class, so AP and F1 say nothing and the attribute is left out of mAP and macro-F1.
    """

    name: str
    threshold: float
    ap: float | None
    f1: float
    f1_at_half: float
    precision: float
    recall: float
    support: int
    negatives: int
    na: int
    evaluated: bool


@dataclass
class Evaluation:
    """What `evaluate` measured. probs (N, A) and labels follow `label_names` (the attributes scored)."""

    model: str
    data: str
    label_names: list[str]
    missing: list[str]
    attributes: list[AttributeScore]
    mAP: float | None
    f1_micro: float
    f1_macro: float | None
    f1_micro_at_half: float
    f1_macro_at_half: float | None
    image_names: list[str]
    probs: np.ndarray
    labels: list[list[int | None]]
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def thresholds(self) -> list[float]:
        return [a.threshold for a in self.attributes]


# ---------------------------------------------------------------- reading and scoring


def read_test_set(data: str, split: str | None = None, label_columns: list[str] | None = None, *,
                  labels: str | None = None, images: str | None = None, group_column: str | None = None,
                  header: bool | None = None, labels_encoding: str | None = None) -> TestSet:
    """One split of any source training accepts: the only one, or `split`, or 'test' when there are several.

    `labels`, `images`, `group_column`, `header` and `labels_encoding` are read as training reads them (--labels,
    --images, --group-column, --header, --labels-encoding); a group column is not an attribute.
    """
    from .sources import load_source  # the readers import `datasets`: only when evaluating

    source = load_source(data, images, labels, label_columns, group_column=group_column, header=header,
                         labels_encoding=labels_encoding)
    splits, label_names, description = source.splits, source.label_names, source.description
    if split is None and len(splits) > 1 and "test" not in splits:
        raise AttrclfError(f"--data '{data}' has the splits {', '.join(splits)}: choose one with --split")
    name = split or ("test" if "test" in splits else next(iter(splits)))
    if name not in splits:
        raise AttrclfError(f"--data '{data}' has no split '{name}' (it has {', '.join(splits)})")
    ds = splits[name]
    return TestSet(list(label_names), list(ds["image"]), list(ds["image_name"]), [list(r) for r in ds["labels"]],
                   f"{description} [{name}]" if len(splits) > 1 else description)


def match_attributes(test_names: list[str], model_names: list[str]) -> list[str]:
    """The model's attributes that the test set lacks; a test attribute the model does not know is an error."""
    unknown = [name for name in test_names if name not in model_names]
    if unknown:
        raise AttrclfError(f"the test set labels attributes the model does not predict: {', '.join(unknown)}.\n"
                           f"  test set: {', '.join(test_names)}\n  model:    {', '.join(model_names)}\n"
                           f"  Rename the columns, or pick the model's ones with --label-columns.")
    return [name for name in model_names if name not in test_names]


def predict_test_set(predictor: Predictor, test: TestSet, batch_size: int = 32):
    """(kept row indices, (N_kept, A_model) probabilities, unreadable [(image, reason)]), in batches."""
    kept, probs, unreadable = [], [], []
    for start in range(0, len(test.images), batch_size):
        pixels = []
        for i in range(start, min(start + batch_size, len(test.images))):
            try:
                pixels.append(predictor.preprocess(test.images[i]))
                kept.append(i)
            except DECODE_ERRORS as e:
                unreadable.append((test.image_names[i], f"cannot read image: {e}"))
        if pixels:
            probs.append(predictor.probs_from_pixels(pixels, batch_size))
    width = len(predictor.label_names)
    return kept, np.concatenate(probs) if probs else np.zeros((0, width), dtype=np.float32), unreadable


def score_attributes(probs: np.ndarray, labels: list[list[int | None]], label_names: list[str],
                     thresholds: list[float]) -> tuple[list[AttributeScore], dict]:
    """Per-attribute scores and {mAP, f1_micro, f1_macro, f1_micro_at_half, f1_macro_at_half}, NA skipped."""
    targets, mask = targets_and_mask(labels, len(label_names))
    positives, negatives = (mask & (targets == 1)).sum(0), (mask & (targets == 0)).sum(0)
    evaluated = (positives > 0) & (negatives > 0)
    ap = [average_precision(probs[mask[:, a], a], targets[mask[:, a], a]) for a in range(len(label_names))]
    tuned = f1_summary(*confusion(probs, targets, mask, thresholds), evaluated)
    half = f1_summary(*confusion(probs, targets, mask, [0.5] * len(label_names)), evaluated)
    attributes = [
        AttributeScore(name=name, threshold=float(thresholds[a]), ap=_number(ap[a]), f1=tuned["f1"][a],
                       f1_at_half=half["f1"][a], precision=tuned["precision"][a], recall=tuned["recall"][a],
                       support=int(positives[a]), negatives=int(negatives[a]), na=int((~mask[:, a]).sum()),
                       evaluated=bool(evaluated[a]))
        for a, name in enumerate(label_names)
    ]
    summary = {"mAP": _number(np.mean([ap[a] for a in np.flatnonzero(evaluated)])) if evaluated.any() else None,
               "f1_micro": tuned["f1_micro"], "f1_macro": _number(tuned["f1_macro"]),
               "f1_micro_at_half": half["f1_micro"], "f1_macro_at_half": _number(half["f1_macro"])}
    return attributes, summary


def targets_and_mask(labels: list[list[int | None]], num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 1 / 0 / None -> (N, A) int64 targets (0 where NA) and the (N, A) bool mask of known labels."""
    mask = np.array([[v is not None for v in row] for row in labels], dtype=bool).reshape(len(labels), num_labels)
    targets = np.array([[v or 0 for v in row] for row in labels], dtype=np.int64).reshape(len(labels), num_labels)
    return targets, mask


def evaluate(predictor: Predictor, test: TestSet, *, model: str = "", batch_size: int = 32) -> Evaluation:
    """Score `predictor` on `test`: the test set's attributes at the model's thresholds and at 0.5."""
    missing = match_attributes(test.label_names, predictor.label_names)
    names = [name for name in predictor.label_names if name in test.label_names]  # the model's order
    columns = [predictor.label_names.index(name) for name in names]
    from_test = [test.label_names.index(name) for name in names]
    kept, probs, unreadable = predict_test_set(predictor, test, batch_size)
    if not kept:
        raise AttrclfError(f"none of the {len(test.images)} images in '{test.description}' could be read")
    labels = [[test.labels[i][c] for c in from_test] for i in kept]
    thresholds = [predictor.thresholds()[c] for c in columns]
    attributes, summary = score_attributes(probs[:, columns], labels, names, thresholds)
    return Evaluation(model=model, data=test.description, label_names=names, missing=missing, attributes=attributes,
                      image_names=[test.image_names[i] for i in kept], probs=probs[:, columns], labels=labels,
                      unreadable=unreadable, **summary)


def _number(value) -> float | None:
    """JSON has no NaN: an undefined score is None."""
    value = float(value)
    return None if np.isnan(value) else value


# ---------------------------------------------------------------- reports and files


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(ev: Evaluation) -> str:
    """The per-attribute table and the summary lines, as printed."""
    lines = [f"model {ev.model} on {ev.data}: {len(ev.image_names)} images scored, {len(ev.unreadable)} unreadable"]
    if ev.missing:
        total = len(ev.label_names) + len(ev.missing)
        lines.append(f"the test set labels {len(ev.label_names)} of the model's {total} attributes; not scored: "
                     f"{', '.join(ev.missing)}")
    width = max(9, *(len(n) for n in ev.label_names))
    lines.append(f"{'attribute':<{width}}  {'AP':>6} {'F1':>6} {'F1@0.5':>6} {'prec':>6} {'recall':>6} "
                 f"{'support':>7} {'neg':>6} {'NA':>6} {'thresh':>6}")
    for a in ev.attributes:
        note = "" if a.evaluated else "  (one class: not in mAP / macro-F1)"
        lines.append(f"{a.name:<{width}}  {_fmt(a.ap):>6} {a.f1:>6.3f} {a.f1_at_half:>6.3f} {a.precision:>6.3f} "
                     f"{a.recall:>6.3f} {a.support:>7} {a.negatives:>6} {a.na:>6} {a.threshold:>6.3f}{note}")
    lines.append(f"mAP {_fmt(ev.mAP)}; at the model's thresholds micro-F1 {ev.f1_micro:.3f}, macro-F1 "
                 f"{_fmt(ev.f1_macro)}; at 0.5 micro-F1 {ev.f1_micro_at_half:.3f}, "
                 f"macro-F1 {_fmt(ev.f1_macro_at_half)}")
    for image, reason in ev.unreadable[:10]:
        lines.append(f"  unreadable {image}: {reason}")
    if len(ev.unreadable) > 10:
        lines.append(f"  ... and {len(ev.unreadable) - 10} more (listed in metrics.json)")
    return "\n".join(lines)


def metrics_json(ev: Evaluation) -> dict:
    """metrics.json of `attrclf evaluate --output DIR`; the file format, described once:

    attrclf_version, model, data: what was scored (data: the test source's description and split).
    num_images: images scored; unreadable: [{"image", "reason"}] for those that failed to decode (not scored).
    label_names: the attributes scored (the model's order); missing_attributes: the model's attributes the test set
        does not label.
    mAP: mean AP over the evaluated attributes (both classes among their known labels); null when none.
    f1_micro, f1_macro: at the model's own thresholds; f1_micro_at_0.5, f1_macro_at_0.5: at 0.5 for every attribute.
    per_attribute: {name: {ap, f1, f1_at_0.5, precision, recall (at the model's threshold), threshold, support (known
        positives), negatives (known negatives), na (NA labels, skipped), evaluated}}.
    Every count and score leaves NA out; an undefined score is null.
    """
    return {
        "attrclf_version": __version__,
        "model": ev.model,
        "data": ev.data,
        "num_images": len(ev.image_names),
        "unreadable": [{"image": image, "reason": reason} for image, reason in ev.unreadable],
        "label_names": ev.label_names,
        "missing_attributes": ev.missing,
        "mAP": ev.mAP,
        "f1_micro": ev.f1_micro,
        "f1_macro": ev.f1_macro,
        "f1_micro_at_0.5": ev.f1_micro_at_half,
        "f1_macro_at_0.5": ev.f1_macro_at_half,
        "per_attribute": {
            a.name: {"ap": a.ap, "f1": a.f1, "f1_at_0.5": a.f1_at_half, "precision": a.precision, "recall": a.recall,
                     "threshold": a.threshold, "support": a.support, "negatives": a.negatives, "na": a.na,
                     "evaluated": a.evaluated}
            for a in ev.attributes
        },
    }


def predictions_csv(ev: Evaluation) -> str:
    """image, then each attribute's probability (`<name>`), then each one's label (`<name>_label`: 1, 0 or empty
    for NA); one row per scored image."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *ev.label_names, *(f"{name}_label" for name in ev.label_names)])
    for image, probs, labels in zip(ev.image_names, ev.probs, ev.labels, strict=True):
        writer.writerow([image, *(f"{p:.6f}" for p in probs), *("" if v is None else v for v in labels)])
    return buffer.getvalue()


def write_outputs(ev: Evaluation, folder: str | Path) -> list[str]:
    """metrics.json, predictions.csv and pr_curves.png into `folder` (each renamed in once complete)."""
    from .plots import plot_pr_curves  # matplotlib: only when writing

    targets, mask = targets_and_mask(ev.labels, len(ev.label_names))

    def fill(staging: Path) -> None:
        (staging / "metrics.json").write_text(json.dumps(metrics_json(ev), indent=2))
        (staging / "predictions.csv").write_text(predictions_csv(ev))
        plot_pr_curves(ev.probs, targets, mask, ev.label_names, ev.thresholds, staging / "pr_curves.png",
                       title="Precision-recall per attribute on the test set")

    return write_each(folder, fill)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrclf evaluate", description="Score a trained attrclf model on a "
                                     "labelled test set (NA skipped): per-attribute AP, F1, precision, recall.")
    parser.add_argument("--model", default="outputs", help="model folder or Hub id (user/name)")
    parser.add_argument("--data", required=True, help="labelled test set: a labels.txt folder, an image folder with "
                                                      "metadata, a saved dataset or a Hub dataset id")
    parser.add_argument("--split", default=None, help="split of --data to score (default: its only split, or 'test')")
    parser.add_argument("--labels", default=None, help="labels file (default: DATA/labels.txt), as in training")
    parser.add_argument("--images", default=None, help="images folder (default: DATA/images, else DATA), as training")
    parser.add_argument("--group-column", default=None,
                        help="a column of the labels that is not an attribute (training's --group-column)")
    parser.add_argument("--label-columns", nargs="+", metavar="NAME", default=None,
                        help="the attributes of --data to score (default: all of them)")
    parser.add_argument("--header", action=argparse.BooleanOptionalAction, default=None,
                        help="labels.txt's first row is the attribute names (--header) or data (--no-header), "
                        "as in training (default: decided from the rows)")
    parser.add_argument("--labels-encoding", default=None, help="labels.txt's text encoding (default: UTF-8)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="write metrics.json, predictions.csv and pr_curves.png here")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--revision", default=None, help="Hub revision of --model (branch, tag or commit)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_backend_argument(parser)
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise AttrclfError(f"--batch-size must be at least 1 (got {args.batch_size})")
    predictor = Predictor.from_pretrained(args.model, revision=args.revision, device=args.device, backend=args.backend)
    test = read_test_set(args.data, args.split, args.label_columns, labels=args.labels, images=args.images,
                         group_column=args.group_column, header=args.header, labels_encoding=args.labels_encoding)
    result = evaluate(predictor, test, model=args.model, batch_size=args.batch_size)
    print(f"backend: {predictor.backend_name}")
    print(format_report(result))
    if args.output:
        written = write_outputs(result, args.output)
        print(f"wrote {', '.join(written)} to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`attrclf evaluate ...`; bad input is one line on stderr and exit code 2."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
