"""Experiment tracking (--report-to) through Accelerate's trackers: TensorBoard, Weights & Biases, MLflow.

What is logged (`accelerator.log` is a no-op without trackers, so the loop calls it unconditionally):
    the run's TrainConfig (init_trackers; lists and None as strings: TensorBoard's hparams take scalars only)
    per optimiser step:  train/loss (the value history.json records), train/lr_head, train/lr_backbone
    per epoch (at its last step): train/epoch_loss, val/loss, val/mAP, val/mAP_ema (with a weight average) and
                         val/AP/<attribute> for each attribute with both classes among its known validation labels
TensorBoard writes to OUTPUT/tracking/<run name>/ (the output folder's name); wandb and mlflow use their own
settings (WANDB_*, MLFLOW_TRACKING_URI), as Accelerate starts them. Only the main process logs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

from .errors import AttrclfError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # --report-to -> package it needs
REPORT_TO = ("none", *TRACKERS, "all")
TRACKING_FOLDER = "tracking"


def chosen_trackers(report_to: str) -> list[str]:
    """--report-to as Accelerate's `log_with`: [] for none; every installed tracker for all; else the one named,
    which must be installed (the error names the package to install)."""
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name, package in TRACKERS.items() if importlib.util.find_spec(package)]
    if report_to not in TRACKERS:
        raise AttrclfError(f"--report-to must be one of {', '.join(REPORT_TO)} (got '{report_to}')")
    package = TRACKERS[report_to]
    if importlib.util.find_spec(package) is None:
        raise AttrclfError(f"--report-to {report_to} needs {package}: pip install {package}")
    return [report_to]


def accelerator_options(cfg) -> dict:
    """Accelerator(...) keyword arguments for --report-to: the trackers and where TensorBoard writes."""
    trackers = chosen_trackers(cfg.report_to)
    if not trackers:
        return {}
    from accelerate.utils import ProjectConfiguration

    folder = Path(cfg.output_dir) / TRACKING_FOLDER
    return {"log_with": trackers, "project_config": ProjectConfiguration(project_dir=str(cfg.output_dir),
                                                                          logging_dir=str(folder))}


def run_name(cfg) -> str:
    return Path(cfg.output_dir).resolve().name or "attrclf"


def start(accelerator, cfg) -> None:
    """init_trackers with the run's settings (scalars only); nothing without --report-to."""
    if accelerator.log_with:
        accelerator.init_trackers(run_name(cfg), config=flat_config(cfg))


def flat_config(cfg) -> dict:
    """The TrainConfig as tracker hyper-parameters: ints, floats, bools and strings."""
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in asdict(cfg).items()}


def step_values(loss: float, lrs: dict[str, float]) -> dict[str, float]:
    """What one optimiser step logs."""
    return {"train/loss": loss, **{f"train/lr_{part}": lr for part, lr in lrs.items()}}


def epoch_values(record, validation, label_names: list[str]) -> dict[str, float]:
    """What one epoch logs: its losses, mAP (raw and averaged weights) and each evaluated attribute's AP."""
    from .metrics import per_attribute_ap

    values = {"train/epoch_loss": record.train_loss, "val/loss": record.val_loss}
    if record.val_mAP is not None:
        values["val/mAP"] = record.val_mAP
    if record.val_mAP_ema is not None:
        values["val/mAP_ema"] = record.val_mAP_ema
    ap, evaluated = per_attribute_ap(validation.probs, validation.targets, validation.mask)
    values.update({f"val/AP/{name}": float(ap[i]) for i, name in enumerate(label_names) if evaluated[i]})
    return values
