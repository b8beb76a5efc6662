"""bench_quality's report: mean +- std over seeds of every figure of the goals table, per-attribute test AP, curves.

Figures (each per recipe and label set, over the training seeds; std is the sample std, ddof=1):
- test mAP, macro-F1 at 0.5, at the run's own thresholds, cross-fitted tuned macro-F1 and its gain over F1 at 0.5;
- the mAP drop when labels are hidden and each attrclf variant's test mAP minus the seed recipe's (paired by seed);
- the switch dip: the largest fall of validation mAP, at any fine-tuning epoch, below the best validation mAP of the
  head stage (0 when it never falls below; None without both stages), of the raw weights and ("kept") of the weights
  attrclf keeps at each epoch, the better of the raw ones and their moving average;
- time to the seed's best validation mAP: seconds (cumulated epoch seconds of history.json / the seed's elapsed) until
  a run first reaches the best validation mAP of the seed recipe with the same seed and labels, as a fraction of the
  seed's own time to it (raw and kept, as for the dip). Both see the same validation images, so the figures are
  comparable; with --jobs 2 the two trainings running at once share the machine, so compare runs of one campaign
  only.
"""

from pathlib import Path

import numpy as np

from .common import table, write_result

SEED_RECIPE = "seed"


def mean_std(values) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def fmt(stats, digits: int = 3) -> str:
    mean, std, _ = stats
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def kept(curve: list[dict]) -> list[dict]:
    """The curve of the weights a run keeps at each epoch: attrclf validates its raw weights and their moving average
    (`val_mAP_ema`) and keeps the better (metrics.json `weights`); a run without an average keeps its one curve."""
    return [{**row, "val_mAP": max(v for v in (row["val_mAP"], row.get("val_mAP_ema")) if v is not None)}
            if row["val_mAP"] is not None else row for row in curve]


def switch_dip(curve: list[dict]) -> float | None:
    head = [row["val_mAP"] for row in curve if row["stage"] == "head" and row["val_mAP"] is not None]
    after = [row["val_mAP"] for row in curve if row["stage"] != "head" and row["val_mAP"] is not None]
    if not head or not after:
        return None
    return max(0.0, max(head) - min(after))


def seconds_to(curve: list[dict], target: float | None) -> float | None:
    return next((row["elapsed"] for row in curve if target is not None and row["val_mAP"] is not None
                 and row["val_mAP"] >= target - 1e-9), None)


def per_run_figures(specs, results) -> dict:
    """run name -> the figures of one run (test metrics, dip, time to the seed's best)."""
    by_name = {s.name: s for s in specs}
    figures = {}
    for name, r in results.items():
        spec, t = by_name[name], r.test
        seed_run = results.get(f"{SEED_RECIPE} {spec.label_set} s{spec.seed}")
        seed_best = max((row["val_mAP"] for row in seed_run.curve if row["val_mAP"] is not None), default=None) \
            if seed_run else None
        mine, seeds = seconds_to(r.curve, seed_best), seconds_to(seed_run.curve, seed_best) if seed_run else None
        kept_curve = kept(r.curve)
        mine_kept = seconds_to(kept_curve, seed_best)
        figures[name] = {
            "mAP": t["mAP"], "f1_at_0.5": t["f1_macro_at_0.5"], "f1_own_thresholds": t["f1_macro_tuned"],
            "f1_crossfit": t["f1_macro_tuned_crossfit"],
            "crossfit_gain": None if t["f1_macro_tuned_crossfit"] is None or t["f1_macro_at_0.5"] is None
            else t["f1_macro_tuned_crossfit"] - t["f1_macro_at_0.5"],
            "switch_dip": switch_dip(r.curve), "switch_dip_kept": switch_dip(kept_curve),
            "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "train_seconds": r.train_seconds,
            "time_to_seed_best_fraction": None if mine is None or not seeds else mine / seeds,
            "time_to_seed_best_fraction_kept": None if mine_kept is None or not seeds else mine_kept / seeds,
            "per_attribute_ap": {n: a["ap"] for n, a in t["per_attribute"].items()},
        }
    return figures


def summarise(specs, figures) -> dict:
    """(recipe, label set) -> {figure: (mean, std, n)}; plus paired differences."""
    groups = {}
    for s in specs:
        groups.setdefault((s.variant, s.label_set), []).append(figures[s.name])
    summary = {}
    for key, rows in groups.items():
        summary[key] = {k: mean_std([r[k] for r in rows]) for k in rows[0] if k != "per_attribute_ap"}
        summary[key]["per_attribute_ap"] = {n: mean_std([r["per_attribute_ap"][n] for r in rows])
                                            for n in rows[0]["per_attribute_ap"]}
    return summary


def paired(specs, figures, a: tuple, b: tuple) -> tuple:
    """mean +- std over seeds of figures[a].mAP - figures[b].mAP, a and b = (recipe, label set), same seed."""
    seeds = sorted({s.seed for s in specs})
    diffs = []
    for seed in seeds:
        x, y = figures.get(f"{a[0]} {a[1]} s{seed}"), figures.get(f"{b[0]} {b[1]} s{seed}")
        if x and y and x["mAP"] is not None and y["mAP"] is not None:
            diffs.append(x["mAP"] - y["mAP"])
    return mean_std(diffs)


def report(args, split, specs, results) -> None:
    figures = per_run_figures(specs, results)
    summary = summarise(specs, figures)
    recipes = list(dict.fromkeys(s.variant for s in specs))
    label_sets = list(dict.fromkeys(s.label_set for s in specs))
    n_seeds = len(args.seeds)
    print(f"\n{args.dataset}, {len(split.test.rows)} test images, {n_seeds} seeds {args.seeds}, {args.epochs} epochs, "
          f"{args.image_size} px; mean ± std (ddof=1) over seeds")
    rows = [[f"{r} {ls}", *(fmt(summary[r, ls][k]) for k in ("mAP", "f1_at_0.5", "f1_own_thresholds", "f1_crossfit",
                                                                "crossfit_gain", "switch_dip", "switch_dip_kept")),
             fmt(summary[r, ls]["best_epoch"], 1), fmt(summary[r, ls]["train_seconds"], 0)]
            for ls in label_sets for r in recipes]
    print(table(rows, ["run", "test mAP", "macro-F1 @0.5", "@own thresholds", "tuned (cross-fit)",
                       "cross-fit - @0.5", "switch dip (val)", "dip (kept)", "best epoch", "train s"]))
    differences = {}
    if "hidden" in label_sets and "full" in label_sets:
        differences["mAP_drop_hidden"] = {r: paired(specs, figures, (r, "full"), (r, "hidden")) for r in recipes}
    if SEED_RECIPE in recipes:
        differences["mAP_minus_seed"] = {f"{r} {ls}": paired(specs, figures, (r, ls), (SEED_RECIPE, ls))
                                         for r in recipes if r != SEED_RECIPE for ls in label_sets}
    if "mAP_drop_hidden" in differences:
        print(table([[r, fmt(v)] for r, v in differences["mAP_drop_hidden"].items()],
                    ["test mAP drop, full -> hidden labels (same seed)", "mean ± std"]))
    if "mAP_minus_seed" in differences:
        print(table([[k, fmt(v)] for k, v in differences["mAP_minus_seed"].items()],
                    ["test mAP minus the seed recipe's (same seed)", "mean ± std"]))
        print(table([[f"{r} {ls}", fmt(summary[r, ls]["time_to_seed_best_fraction"]),
                      f"{summary[r, ls]['time_to_seed_best_fraction'][2]}/{n_seeds}",
                      fmt(summary[r, ls]["time_to_seed_best_fraction_kept"])]
                     for ls in label_sets for r in recipes if r != SEED_RECIPE],
                    ["time to the seed's best val mAP / the seed's", "mean ± std", "reached", "kept weights"]))
    names = split.test.label_names
    test_targets = split.test.targets()
    columns = [(r, ls) for ls in label_sets for r in recipes]
    rows = [[n, int((test_targets[:, a] == 1).sum()), *(fmt(summary[c]["per_attribute_ap"][n]) for c in columns)]
            for a, n in enumerate(names)]
    print(table(rows, ["test AP", "test positives", *(f"{r} {ls}" for r, ls in columns)]))
    checks = {name: r.split_check for name, r in results.items() if r.split_check and r.split_check != "ok"}
    if checks:
        print("WARNING: validation split differs between attrclf and the seed recipe:", checks)
    # named after the campaign's folder (quality_TAG by default), so campaigns with their own --out-dir under one
    # parent folder (gpu_quality.sh runs several at once) keep a summary each instead of overwriting one quality_TAG
    stem = args.out_dir.name
    png = plot_curves(specs, results, title=args.dataset, path=args.out_dir.parent / f"{stem}_curves.png")
    path = write_result(stem, {
        "dataset": args.dataset, "seeds": args.seeds, "epochs": args.epochs, "image_size": args.image_size,
        "limit_groups": args.limit_groups, "backbone": args.backbone, "jobs": args.jobs, "threads": args.threads,
        "test_seed": args.test_seed, "trainval_images": len(split.trainval.rows), "test_images": len(split.test.rows),
        "variants": {r: args.variants.get(r) for r in recipes}, "hide": args.hide,
        "summary": {f"{r} {ls}": v for (r, ls), v in summary.items()},
        "differences": differences, "runs": figures, "split_checks": {n: r.split_check for n, r in results.items()},
        "curves": {name: r.curve for name, r in results.items()}}, args.out_dir.parent)
    print(f"wrote {path} and {png}")


def plot_curves(specs, results, *, title: str, path: Path) -> Path:
    """Per-epoch validation mAP of every run: one panel per label set, a colour per recipe, a line style per seed;
    written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label_sets = list(dict.fromkeys(s.label_set for s in specs))
    recipes = list(dict.fromkeys(s.variant for s in specs))
    seeds = sorted({s.seed for s in specs})
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(label_sets), figsize=(6 * len(label_sets), 4.5), squeeze=False, sharey=True)
    for ax, label_set in zip(axes[0], label_sets, strict=True):
        for s in specs:
            if s.label_set != label_set:
                continue
            curve = results[s.name].curve
            color = f"C{recipes.index(s.variant)}"
            ax.plot([row["epoch"] for row in curve], [row["val_mAP"] for row in curve], color=color,
                    linestyle=styles[seeds.index(s.seed) % len(styles)], marker=".",
                    label=s.variant if s.seed == seeds[0] else None)
        ax.set_title(f"{title}, {label_set} labels (line style = seed)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("validation mAP")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
