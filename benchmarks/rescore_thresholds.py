"""How each threshold rule does on new images, from the saved models of bench_quality campaigns (no training).

    python -m benchmarks.rescore_thresholds --dataset emoji R/CAMPAIGN [R/CAMPAIGN ...] [--name TAG] [--tta]

A threshold rule only decides config.json's thresholds after training (the weights do not depend on it), so the
models a campaign saved can be scored under every rule. For each run folder (CAMPAIGN/runs/LABELS-VARIANT-sSEED/model)
the saved model predicts its own validation images (CAMPAIGN/val_sSEED.txt) and the TEST images (CAMPAIGN/test.txt)
with `attrclf.Predictor` in fp32 (bench_quality's TEST_BACKEND); the probabilities are kept beside the model
(rescore_probs.npz). Then, on TEST, per rule (`attrclf.metrics.THRESHOLD_RULES`, with the run's pos_weight from
metrics.json):
  own       macro-F1 at thresholds tuned on the validation images: what a user of the saved model gets
  crossfit  macro-F1 tuned on one half of TEST and scored on the other, both ways (seed 0, as bench_quality)
each beside macro-F1 at 0.5; differences are paired by run. With --tta the TEST images are predicted once more with
`Predictor(tta=True)` (each image averaged with its mirror, as `attrclf predict --tta` does) and TEST mAP is compared
with and without it, paired by run. Prints one table per label set and writes
benchmarks/results/rescore_thresholds_TAG.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from attrclf import Predictor
from attrclf.metrics import (
    THRESHOLD_RULES,
    confusion,
    crossfit_confusion,
    f1_summary,
    mean_average_precision,
    per_attribute_ap,
    tune_thresholds,
)

from .bench_quality import TEST_BACKEND
from .common import DATASETS, LabelTable, table, write_result


def run_probs(run: Path, campaign: Path, table_all: LabelTable, images: Path, *, tta: bool = False
              ) -> dict[str, np.ndarray]:
    """Validation and TEST probabilities of the run's saved model (cached in the run folder), with the targets; with
    `tta` also the TEST probabilities under test-time augmentation ("test_tta_probs")."""
    cache = run / "rescore_probs.npz"
    seed = int(run.name.rsplit("-s", 1)[1])
    splits = {"val": campaign / f"val_s{seed}.txt", "test": campaign / "test.txt"}
    views = {"val": ("val", False), "test": ("test", False)} | ({"test_tta": ("test", True)} if tta else {})
    arrays = dict(np.load(cache)) if cache.is_file() else {}
    if str(arrays.get("backend")) != TEST_BACKEND:  # a cache of an earlier version predicted with the auto backend
        arrays = {"backend": np.array(TEST_BACKEND)}
    missing = [view for view in views if f"{view}_probs" not in arrays]
    if not missing:
        return arrays
    chosen = {split: table_all.select(set(splits[split].read_text().split()))
              for split in {views[view][0] for view in missing}}  # only the splits a missing view predicts
    predictors = {flips: Predictor.from_pretrained(str(run / "model"), device="cpu", backend=TEST_BACKEND, tta=flips)
                  for flips in {views[view][1] for view in missing}}  # fp32, as bench_quality scores TEST
    for split, labels in chosen.items():
        arrays[f"{split}_targets"] = labels.targets()
    for view in missing:
        split, flips = views[view]
        names = chosen[split].names()
        arrays[f"{view}_probs"] = predictors[flips].predict_probs([images / name for name in names], batch_size=64)
    np.savez(cache, **arrays)
    return arrays


def macro_f1(probs, targets, mask, thresholds, evaluated) -> float:
    return f1_summary(*confusion(probs, targets, mask, thresholds), evaluated)["f1_macro"]


def score_run(arrays: dict[str, np.ndarray], pos_weight: list[float]) -> dict:
    """TEST macro-F1 at 0.5 and, per rule, at validation-tuned thresholds and cross-fitted on TEST."""
    val_t, test_t = arrays["val_targets"], arrays["test_targets"]
    val = (arrays["val_probs"], val_t == 1, val_t >= 0)
    test = (arrays["test_probs"], test_t == 1, test_t >= 0)
    _, evaluated = per_attribute_ap(*test)
    scores = {"at_0.5": macro_f1(*test, [0.5] * test_t.shape[1], evaluated)}
    for rule in THRESHOLD_RULES:
        tuned = tune_thresholds(*val, rule=rule, pos_weight=pos_weight)
        crossfit = crossfit_confusion(*test, rule=rule, pos_weight=pos_weight)
        scores[rule] = {"own": macro_f1(*test, tuned, evaluated),
                        "crossfit": f1_summary(*crossfit, evaluated)["f1_macro"]}
    scores["mAP"] = mean_average_precision(*test)
    if "test_tta_probs" in arrays:
        scores["mAP_tta"] = mean_average_precision(arrays["test_tta_probs"], *test[1:])
    return scores


def spread(values) -> str:
    """Mean ± std over runs, in points."""
    values = 100 * np.asarray(values)
    return f"{values.mean():+.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}"


def summary(scores: list[dict]) -> list[list]:
    """Rows: rule, own and cross-fitted F1 minus F1 at 0.5 (mean ± std over runs, in points)."""
    half = [s["at_0.5"] for s in scores]
    rows = [["F1 at 0.5", f"{np.mean(half):.3f}", "", ""]]
    for rule in THRESHOLD_RULES:
        own = [s[rule]["own"] for s in scores]
        crossfit = [s[rule]["crossfit"] for s in scores]
        rows.append([rule, f"{np.mean(own):.3f} / {np.mean(crossfit):.3f}",
                     spread(np.subtract(own, half)), spread(np.subtract(crossfit, half))])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("campaigns", nargs="+", type=Path, help="bench_quality --out-dir folders")
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--name", default=None, help="TAG of the JSON (default: the dataset)")
    parser.add_argument("--tta", action="store_true",
                        help="also predict TEST with test-time augmentation and compare TEST mAP with and without")
    args = parser.parse_args(argv)
    data_dir, _ = DATASETS[args.dataset]
    table_all = LabelTable.read(data_dir / "labels.txt")
    by_labels: dict[str, list] = {}
    runs_json = {}
    for campaign in args.campaigns:
        for run in sorted((campaign / "runs").glob("*-s*")):
            if not (run / "model" / "model.safetensors").is_file():
                continue
            pos_weight = list(json.loads((run / "model" / "metrics.json").read_text())["pos_weight"].values())
            scores = score_run(run_probs(run, campaign, table_all, data_dir / "images", tta=args.tta), pos_weight)
            runs_json[f"{campaign.name}/{run.name}"] = scores
            by_labels.setdefault(run.name.split("-", 1)[0], []).append(scores)
            print(f"{campaign.name}/{run.name}: F1 at 0.5 {scores['at_0.5']:.3f}, "
                  + ", ".join(f"{r} {scores[r]['own']:.3f} / {scores[r]['crossfit']:.3f}" for r in THRESHOLD_RULES),
                  flush=True)
    if not runs_json:
        sys.exit("error: no saved model under CAMPAIGN/runs/*/model: give bench_quality --out-dir folders")
    summaries = {}
    for labels, scores in by_labels.items():
        print(f"\n{args.dataset}, {labels} labels, {len(scores)} runs: TEST macro-F1 (own / cross-fitted), "
              "and minus F1 at 0.5 in points (mean ± std over runs)")
        rows = summary(scores)
        print(table(rows, ["rule", "own / crossfit", "own - at 0.5", "crossfit - at 0.5"]))
        summaries[labels] = rows
        if args.tta:
            plain, tta = [s["mAP"] for s in scores], [s["mAP_tta"] for s in scores]
            print(f"TEST mAP {np.mean(plain):.3f}, with --tta {np.mean(tta):.3f}: {spread(np.subtract(tta, plain))} "
                  "points (paired by run)")
            summaries[f"{labels}_tta"] = {"mAP": plain, "mAP_tta": tta}
    path = write_result(f"rescore_thresholds_{args.name or args.dataset}",
                        {"dataset": args.dataset, "campaigns": [str(c) for c in args.campaigns], "runs": runs_json,
                         "summary": summaries})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
