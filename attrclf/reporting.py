"""What a run shows and leaves behind: progress bars, metrics.json (its format is documented here), the output
folder, and the tables printed at the end.

metrics.json, written by `write_outputs` from `finalize`'s dict:
    attrclf_version      the attrclf that trained the model
    validation           the best epoch on the validation split: "loss" (over known labels) and everything
                         `metrics.evaluate_predictions` returns at the tuned thresholds: mAP, f1_micro_at_0.5,
                         f1_macro_at_0.5, f1_micro_tuned, f1_macro_tuned, f1_macro_tuned_crossfit, evaluated_attributes,
                         num_images, per_attribute {name: ap, threshold, precision, recall, f1, f1_at_0.5, positives,
                         negatives, na, evaluated}; a figure that is undefined (no attribute with both classes) is null
    best_epoch, epochs_run, stopped_early, train_seconds, world_size, num_machines, mixed_precision, resumed_from
                         (a checkpoint path or null)
    weights              "raw" or "ema": which weights the best epoch kept (attrclf.ema); ema_decay its setting
    data                 source, split, train_images, validation_images, label_names, train_counts and
                         validation_counts ({name: {positive, negative, na}}), skipped_images, skipped ([{image,
                         reason}]: unreadable before training), decode_failures (a count) and decode_failed_images
                         ({name: epochs it failed to decode in}: images that passed the check but broke in training)
    pos_weight           {name: the loss's positive weight}
    na_policy            {"policy": ignore | negative | pseudo | selective | teacher | fixmatch, and for pseudo its
                         pseudo_low, pseudo_high, pseudo_weight, for selective its selective_max_prior, _likely,
                         _weight, for teacher its teacher_weight, for fixmatch its fixmatch_threshold, _weight,
                         _negatives, _pos_weight, _jitter}:
                         what the training loss did with NA (validation and these counts: real labels)
    threshold_rule       "half-f1" or "max-f1": how the thresholds were tuned (--threshold-rule, 'auto' decided)
    thresholds_note      how the thresholds were chosen and which F1 is honest
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from . import __version__
from .card import render_card
from .config import TrainConfig
from .fileio import write_each
from .hardware import num_machines
from .labels import label_counts
from .metrics import evaluate_predictions, tune_thresholds
from .model import AttrClassifier
from .plots import plot_loss_curves, plot_pr_curves
from .sources import AttrData
from .state import FitResult


def progress(iterable, accelerator: Accelerator, description: str):
    """A tqdm bar with ETA on the main process; in a log file (no terminal) it updates every 30 s, not every step."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=description, leave=False, disable=not accelerator.is_local_main_process,
                dynamic_ncols=True, mininterval=0.5 if interactive else 30)


def finalize(model: AttrClassifier, result: FitResult, data: AttrData, cfg: TrainConfig) -> dict:
    """Load the best weights, tune per-attribute thresholds on validation, and build metrics.json's content.

    The full metric suite (F1 at 0.5, tuned and cross-fitted) runs here once, on the best epoch; each epoch computed
    only its mAP.
    """
    best = result.best
    model.load_state_dict(best.state, strict=True)
    model.eval()
    rule = {"rule": cfg.tuning_rule, "pos_weight": result.pos_weight}
    thresholds = tune_thresholds(best.probs, best.targets, best.mask, **rule)
    model.config.thresholds = thresholds
    evaluation = evaluate_predictions(best.probs, best.targets, best.mask, data.label_names, thresholds, **rule)
    names = data.label_names
    return {
        "attrclf_version": __version__,
        "validation": {"loss": best.val_loss, **evaluation},
        "best_epoch": best.epoch,
        "weights": best.weights,
        "ema_decay": cfg.ema_decay,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 1),
        "world_size": result.world_size,
        "num_machines": num_machines(result.world_size),
        "mixed_precision": result.mixed_precision,
        "resumed_from": result.resumed_from,
        "data": {
            "source": data.source,
            "split": data.split,
            "train_images": len(data.train),
            "validation_images": len(data.validation),
            "label_names": names,
            "train_counts": label_counts(data.train["labels"], len(names)).by_attribute(names),
            "validation_counts": label_counts(data.validation["labels"], len(names)).by_attribute(names),
            "skipped_images": len(data.skipped),
            "skipped": data.skipped,
            "decode_failures": sum(result.decode_failures.values()),
            "decode_failed_images": result.decode_failures,
        },
        "pos_weight": dict(zip(names, [round(w, 4) for w in result.pos_weight], strict=True)),
        "na_policy": na_policy_record(cfg),
        "threshold_rule": cfg.tuning_rule,
        "thresholds_note": THRESHOLD_NOTES[cfg.tuning_rule] + "; f1_macro_tuned is measured on the same images "
                           "(optimistic), f1_macro_tuned_crossfit on held-out halves, tuned the same way (honest)",
    }


THRESHOLD_NOTES = {
    "half-f1": "each threshold is half the best F1 reached on the validation split, as a probability with pos_weight "
               "taken out (the F1-optimal threshold of calibrated probabilities)",
    "max-f1": "each threshold maximises F1 on the validation split",
}


def na_policy_record(cfg: TrainConfig) -> dict:
    """metrics.json's "na_policy": the policy, with its settings when it has some."""
    if cfg.na_policy == "pseudo":
        return {"policy": "pseudo", "pseudo_low": cfg.pseudo_low, "pseudo_high": cfg.pseudo_high,
                "pseudo_weight": cfg.pseudo_weight}
    if cfg.na_policy == "selective":
        return {"policy": "selective", "selective_max_prior": cfg.selective_max_prior,
                "selective_likely": cfg.selective_likely, "selective_weight": cfg.selective_weight}
    if cfg.na_policy == "teacher":
        return {"policy": "teacher", "teacher_weight": cfg.teacher_weight}
    if cfg.na_policy == "fixmatch":
        return {"policy": "fixmatch", "fixmatch_threshold": cfg.fixmatch_threshold,
                "fixmatch_weight": cfg.fixmatch_weight, "fixmatch_negatives": cfg.fixmatch_negatives,
                "fixmatch_pos_weight": cfg.fixmatch_pos_weight, "fixmatch_jitter": cfg.fixmatch_jitter}
    return {"policy": cfg.na_policy}


def write_outputs(model: AttrClassifier, metrics: dict, result: FitResult, *, cfg: TrainConfig,
                  output_dir: Path) -> list[str]:
    """Write the model package and reports: each file is staged, then renamed into place; returns the file names."""
    history = result.history.to_dict()

    def fill(staging: Path) -> None:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (staging / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (staging / "history.json").write_text(json.dumps(history))
        plot_loss_curves(history, staging / "loss_curve.png",
                         title=f"attrclf: {model.config.backbone}, {len(model.config.label_names)} attributes, "
                               f"best validation mAP {fmt(metrics['validation']['mAP'], 4)}")
        plot_pr_curves(result.best.probs, result.best.targets, result.best.mask, model.config.label_names,
                       model.config.thresholds, staging / "pr_curves.png")
        render_card(asdict(model.config), metrics, asdict(cfg)).save(staging / "README.md")
        model.save_pretrained(staging)

    return write_each(output_dir, fill)


def summary_table(metrics: dict) -> str:
    """The per-attribute validation table printed at the end of training."""
    v = metrics["validation"]
    lines = [f"{'attribute':<20} {'AP':>6} {'F1@0.5':>7} {'F1':>6} {'thresh':>7} {'pos':>5} {'neg':>5} {'NA':>5}"]
    for name, row in v["per_attribute"].items():
        lines.append(f"{name:<20} {fmt(row['ap']):>6} {fmt(row['f1_at_0.5']):>7} {fmt(row['f1']):>6} "
                     f"{row['threshold']:>7.3f} {row['positives']:>5} {row['negatives']:>5} {row['na']:>5}")
    lines.append(f"mAP {fmt(v['mAP'])}   macro-F1 at 0.5 {fmt(v['f1_macro_at_0.5'])}   "
                 f"tuned {fmt(v['f1_macro_tuned'])} (held-out halves: {fmt(v['f1_macro_tuned_crossfit'])})   "
                 f"micro-F1 tuned {fmt(v['f1_micro_tuned'])}")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure for a table or a log line; "n/a" when undefined."""
    return "n/a" if value is None else f"{value:.{digits}f}"
