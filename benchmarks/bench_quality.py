"""Quality on real data: attrclf vs the seed recipe on emoji with MobileNetV2-ImageNet, same split, backbone, epochs.

    python -m benchmarks.prepare_emoji && python -m benchmarks.prepare_weights    # once
    python -m benchmarks.bench_quality [--epochs 30] [--limit-groups 0] [--launcher accelerate]

Four trainings, each in its own process: attrclf (`train.py`) and the seed recipe (`benchmarks/seed_baseline.py`), on
the full labels and with a further 50% of the known training labels hidden at random (validation labels untouched).
Both validate on the same images: attrclf's grouped split (by base emoji), handed to the baseline as a list. Both are
scored by the same code (attrclf.metrics) on their own best epoch's validation probabilities: masked mAP, macro-F1 at
0.5, at thresholds tuned on the validation images (optimistic) and cross-fitted (tuned on one half, scored on the
other: honest), per-attribute AP; and the wall time for attrclf to first reach the baseline's best validation mAP.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from attrclf.metrics import evaluate_predictions
from attrclf.sources import prepare_data

from .common import (
    EMOJI,
    GROUP_COLUMN,
    RESULTS,
    WEIGHTS,
    hide_training_labels,
    subset_labels,
    table,
    write_result,
)

REPO = Path(__file__).resolve().parent.parent


def run(command: list[str], log: Path) -> None:
    print("$", " ".join(command), flush=True)
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if result.returncode != 0:
        sys.exit(f"error: the command above failed (exit {result.returncode}); see {log}")


def train_attrclf(args, labels: Path, out: Path) -> dict:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"] if args.launcher == "accelerate" else [sys.executable]
    run([*launcher, "train.py", "--data", str(args.data_dir), "--labels", str(labels),
         "--images", str(args.data_dir / "images"), "--group-column", GROUP_COLUMN, "--backbone", args.backbone,
         "--backbone-weights", str(args.weights), "--epochs", str(args.epochs), "--seed", str(args.seed),
         "--image-size", str(args.image_size), "--output-dir", str(out), *args.attrclf_args], out.with_suffix(".log"))
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())["epochs"]
    return {"metrics": metrics["validation"], "curve": list(zip(np.cumsum(history["seconds"]).tolist(),
                                                                history["val_mAP"])),
            "train_seconds": metrics["train_seconds"], "best_epoch": metrics["best_epoch"]}


def train_seed(args, labels: Path, val_list: Path, out: Path) -> dict:
    run([sys.executable, "-m", "benchmarks.seed_baseline", "--data", str(args.data_dir), "--labels", str(labels),
         "--images", str(args.data_dir / "images"), "--group-column", GROUP_COLUMN, "--val-list", str(val_list),
         "--backbone", args.backbone, "--backbone-weights", str(args.weights), "--epochs", str(args.epochs),
         "--seed", str(args.seed), "--image-size", str(args.image_size), "--out-dir", str(out)], out.with_suffix(".log"))
    result = json.loads((out / "result.json").read_text())
    predictions = np.load(out / "val_predictions.npz")
    targets = predictions["targets"]
    metrics = evaluate_predictions(predictions["probs"], targets == 1, targets >= 0, result["label_names"])
    curve = [(row["elapsed"], row["val_mAP"]) for row in result["history"]]
    return {"metrics": metrics, "curve": curve, "train_seconds": curve[-1][0], "best_epoch": result["best_epoch"]}


def time_to_reach(curve: list, target: float | None) -> float | None:
    return next((seconds for seconds, value in curve if value is not None and target is not None
                 and value >= target - 1e-9), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=EMOJI)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--limit-groups", type=int, default=0, help="use this many base emoji (0: all)")
    parser.add_argument("--hide", type=float, default=0.5, help="fraction of known training labels hidden")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    parser.add_argument("--out-dir", type=Path, default=RESULTS / "quality")
    parser.add_argument("--attrclf-args", nargs=argparse.REMAINDER, default=[],
                        help="extra train.py flags, last on the line")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    labels = subset_labels(args.data_dir, args.out_dir / "labels.txt", args.limit_groups or None)
    data = prepare_data(args.data_dir, args.data_dir / "images", labels, group_column=GROUP_COLUMN, val_fraction=0.2,
                        seed=args.seed)
    val_list = args.out_dir / "val.txt"
    val_list.write_text("\n".join(data.validation["image_name"]) + "\n")
    hidden, known = hide_training_labels(labels, set(data.validation["image_name"]), args.hide,
                                         args.out_dir / "labels_hidden.txt", args.seed)
    print(f"{len(data.train)} train / {len(data.validation)} validation images; hiding {hidden} of {known} known "
          f"training labels for the robustness runs")
    runs = {}
    for variant, file in (("full", labels), ("hidden", args.out_dir / "labels_hidden.txt")):
        runs[f"attrclf {variant}"] = train_attrclf(args, file, args.out_dir / f"attrclf_{variant}")
        runs[f"seed {variant}"] = train_seed(args, file, val_list, args.out_dir / f"seed_{variant}")
    report(args, data, runs)


def report(args, data, runs: dict) -> None:
    rows = []
    for name, r in runs.items():
        m = r["metrics"]
        rows.append([name, m["mAP"], m["f1_macro_at_0.5"], m["f1_macro_tuned"], m["f1_macro_tuned_crossfit"],
                     r["best_epoch"], round(r["train_seconds"])])
    print(table(rows, ["run", "mAP", "macro-F1 @0.5", "tuned (same images)", "tuned (cross-fit)", "best epoch",
                       "seconds"]))
    names = data.label_names
    per_attribute = [[n, *(runs[r]["metrics"]["per_attribute"][n]["ap"] for r in runs)] for n in names]
    print(table(per_attribute, ["AP", *runs]))
    a, s = runs["attrclf full"]["metrics"], runs["seed full"]["metrics"]
    drop = {k: runs[f"{k} full"]["metrics"]["mAP"] - runs[f"{k} hidden"]["metrics"]["mAP"] for k in ("attrclf", "seed")}
    seed_best = max((v for _, v in runs["seed full"]["curve"] if v is not None), default=None)
    reach = {"attrclf": time_to_reach(runs["attrclf full"]["curve"], seed_best),
             "seed": time_to_reach(runs["seed full"]["curve"], seed_best)}
    goals = [
        ["attrclf mAP >= seed + 0.03", f"{a['mAP']:.3f} vs {s['mAP']:.3f}", a["mAP"] >= s["mAP"] + 0.03],
        ["tuned macro-F1 (cross-fit) >= F1@0.5 + 0.05",
         f"{a['f1_macro_tuned_crossfit']:.3f} vs {a['f1_macro_at_0.5']:.3f}",
         a["f1_macro_tuned_crossfit"] >= a["f1_macro_at_0.5"] + 0.05],
        ["mAP drop with 50% more hidden <= 0.02", f"attrclf {drop['attrclf']:.3f}, seed {drop['seed']:.3f}",
         drop["attrclf"] <= 0.02],
        ["time to the seed's best val mAP <= 1/4 of the seed's",
         f"attrclf {_seconds(reach['attrclf'])}, seed {_seconds(reach['seed'])}",
         reach["attrclf"] is not None and reach["seed"] is not None and reach["attrclf"] <= reach["seed"] / 4],
    ]
    print(table(goals, ["goal", "measured", "met"]))
    path = write_result("quality", {"backbone": args.backbone, "epochs": args.epochs, "limit_groups": args.limit_groups,
                                    "train_images": len(data.train), "validation_images": len(data.validation),
                                    "runs": runs, "mAP_drop": drop, "seconds_to_seed_best_mAP": reach,
                                    "seed_best_val_mAP": seed_best}, args.out_dir.parent)
    print(f"wrote {path}")


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


if __name__ == "__main__":
    main()
