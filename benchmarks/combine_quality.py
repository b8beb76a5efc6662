"""One goals table from several bench_quality campaigns (e.g. "attrclf before" run from a checkout of an earlier commit
with its own --out-dir, beside today's campaign with the seed recipe).

    python -m benchmarks.combine_quality --name emoji DIR_AFTER DIR_BEFORE [DIR ...]

Reads every finished run (DIR/runs/LABELS-VARIANT-sSEED/bench_result.json) of the given campaign folders; all must be
campaigns of the same data set, split, epochs and size (their keys say so; a mismatch is an error). Prints the figures
of benchmarks/quality_report.py (mean +- std over seeds) for each recipe and label set, every variant's test mAP minus
the seed recipe's and minus each other variant's (paired by seed), the mAP drop when labels are hidden, and
per-attribute test AP; writes benchmarks/results/combined_NAME.json and combined_NAME_curves.png (per-epoch validation
mAP of every run).
"""

import argparse
import json
from pathlib import Path

from .bench_quality import RunResult, RunSpec
from .common import RESULTS, table, write_result
from .quality_report import SEED_RECIPE, fmt, paired, per_run_figures, plot_curves, summarise

SAME = ("epochs", "image_size", "backbone", "test")  # key fields every combined run must share


def with_average_curve(result: RunResult, run_dir: Path) -> RunResult:
    """A run scored before bench_quality kept the moving average's validation mAP in its curve: take it from the
    run's history.json, when the model folder is still there."""
    history = run_dir / "model" / "history.json"
    if not result.curve or "val_mAP_ema" in result.curve[0] or not history.is_file():
        return result
    averaged = json.loads(history.read_text())["epochs"]["val_mAP_ema"]
    result.curve = [{**row, "val_mAP_ema": a} for row, a in zip(result.curve, averaged, strict=True)]
    return result


def load_runs(folders: list[Path]) -> tuple[list[RunSpec], dict[str, RunResult]]:
    specs, results, reference = [], {}, None
    for folder in folders:
        for path in sorted(folder.glob("runs/*/bench_result.json")):
            label_set, variant, seed = path.parent.name.rsplit("-", 2)
            result = with_average_curve(RunResult(**json.loads(path.read_text())), path.parent)
            shared = {k: result.key.get(k) for k in SAME}
            if reference is None:
                reference = shared
            elif shared != reference:
                raise SystemExit(f"error: {path} is from another campaign ({shared} vs {reference})")
            spec = RunSpec(variant, label_set, int(seed[1:]), None, path, path, path.parent)
            if spec.name in results:
                raise SystemExit(f"error: two folders hold the run '{spec.name}'")
            specs.append(spec)
            results[spec.name] = result
    return specs, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench_quality --out-dir folders")
    parser.add_argument("--name", required=True, help="names the result file: benchmarks/results/combined_NAME.json")
    args = parser.parse_args(argv)
    specs, results = load_runs(args.folders)
    figures = per_run_figures(specs, results)
    summary = summarise(specs, figures)
    keys = sorted(summary, key=lambda k: (k[1], k[0] != SEED_RECIPE, k[0]))
    columns = ["mAP", "f1_at_0.5", "f1_crossfit", "crossfit_gain", "switch_dip", "switch_dip_kept",
               "time_to_seed_best_fraction", "time_to_seed_best_fraction_kept", "best_epoch", "train_seconds"]
    rows = [[f"{v} {ls}", summary[(v, ls)]["mAP"][2], *(fmt(summary[(v, ls)][c]) for c in columns)] for v, ls in keys]
    print(table(rows, ["run", "seeds", *columns]))
    variants = sorted({v for v, _ in summary})
    pairs = {}
    for label_set in sorted({ls for _, ls in summary}):
        for a in variants:
            for b in variants:
                if a != b and (a, label_set) in summary and (b, label_set) in summary:
                    pairs[f"{a} - {b} ({label_set})"] = paired(specs, figures, (a, label_set), (b, label_set))
    for v in variants:
        if (v, "full") in summary and (v, "hidden") in summary:
            pairs[f"{v}: full - hidden"] = paired(specs, figures, (v, "full"), (v, "hidden"))
    print(table([[name, fmt(stats), stats[2]] for name, stats in pairs.items()], ["test mAP difference", "mean ± std",
                                                                                   "seeds"]))
    attributes = sorted(next(iter(summary.values()))["per_attribute_ap"])
    print(table([[n, *(fmt(summary[k]["per_attribute_ap"][n], 2) for k in keys)] for n in attributes],
                ["test AP", *(f"{v} {ls}" for v, ls in keys)]))
    path = write_result(f"combined_{args.name}", {
        "folders": [str(f) for f in args.folders], "figures": figures,
        "summary": {f"{v} {ls}": s for (v, ls), s in summary.items()},
        "paired": pairs}, RESULTS)
    png = plot_curves(specs, results, title=args.name, path=RESULTS / f"combined_{args.name}_curves.png")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
