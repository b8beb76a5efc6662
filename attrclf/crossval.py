"""k-fold cross-validation (--folds K): one model per fold in OUTPUT/fold_k/, and OUTPUT/cv_summary.json."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from accelerate import Accelerator

from .checkpoints import checkpoint_root, list_checkpoints
from .config import LATEST, TrainConfig
from .engine import train_and_save
from .fileio import atomic_write_json
from .reporting import fmt
from .sources import AttrData
from .splits import make_folds

CV_FIGURES = ("mAP", "f1_macro_at_0.5", "f1_macro_tuned_crossfit")


def cross_validate(cfg: TrainConfig, data: AttrData, accelerator: Accelerator) -> dict:
    """--folds K: one model per fold in OUTPUT/fold_k/, then OUTPUT/cv_summary.json; returns the summary.

    With --resume, folds whose model is complete are read back, the interrupted one continues from its checkpoint.
    """
    fold_metrics = []
    for k, fold in enumerate(make_folds(data, cfg.folds, cfg.seed), start=1):
        folder = Path(cfg.output_dir) / f"fold_{k}"
        has_checkpoints = bool(list_checkpoints(checkpoint_root(folder)))
        if cfg.resume and not has_checkpoints and (folder / "metrics.json").is_file():
            accelerator.print(f"fold {k}/{cfg.folds}: complete, read from {folder}/metrics.json")
            fold_metrics.append(json.loads((folder / "metrics.json").read_text()))
            continue
        accelerator.print(f"fold {k}/{cfg.folds}: {len(fold.train)} train / {len(fold.validation)} validation images")
        resume = LATEST if cfg.resume and has_checkpoints else None
        fold_metrics.append(train_and_save(replace(cfg, output_dir=str(folder), folds=None, resume=resume), fold,
                                           accelerator))
    summary = cv_summary(fold_metrics)
    if accelerator.is_main_process:
        atomic_write_json(Path(cfg.output_dir) / "cv_summary.json", summary)
        accelerator.print(cv_table(summary))
        folds = ", ".join(f"fold_{k}/" for k in range(1, cfg.folds + 1))
        accelerator.print(f"saved to {cfg.output_dir}/: cv_summary.json, {folds}")
    accelerator.wait_for_everyone()
    return summary


def cv_summary(fold_metrics: list[dict]) -> dict:
    """Per-fold validation figures, and their mean and (population, numpy's default) standard deviation."""
    folds = [{"fold": k, "validation_images": m["data"]["validation_images"], "best_epoch": m["best_epoch"],
              **{name: m["validation"][name] for name in CV_FIGURES}} for k, m in enumerate(fold_metrics, start=1)]
    summary = {}
    for name in CV_FIGURES:
        values = [row[name] for row in folds if row[name] is not None]
        summary[name] = {"mean": float(np.mean(values)) if values else None,
                         "std": float(np.std(values)) if values else None, "folds": len(values)}
    return {"folds": folds, "summary": summary,
            "note": "std is the population standard deviation over the folds (ddof=0); a fold without a figure "
                    "(no attribute with both classes among its known labels) is left out of its mean"}


def cv_table(summary: dict) -> str:
    """The cross-validation table printed at the end of --folds."""
    def row(first: str, second, values) -> str:
        return f"{first:<6} {second:>6} " + " ".join(f"{value:>24}" for value in values)

    lines = [row("fold", "images", CV_FIGURES)]
    for fold in summary["folds"]:
        lines.append(row(str(fold["fold"]), fold["validation_images"], [fmt(fold[name]) for name in CV_FIGURES]))
    for figure in ("mean", "std"):
        lines.append(row(figure, "", [fmt(summary["summary"][name][figure]) for name in CV_FIGURES]))
    return "\n".join(lines)
