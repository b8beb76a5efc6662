"""TrainConfig (one run's optimisation and data settings), its command line, and `--config FILE`.

train_config.json is `asdict(TrainConfig)` after `resolve`; `--config` reads it back (or a hand-written YAML / JSON of
the same fields), so `train.py --config outputs/train_config.json` repeats a run. Flags given on the command line win
over the file.
"""

import argparse
import copy
import json
import math
import os
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import torch

from .errors import AttrclfError
from .fileio import is_hub_id
from .heads import HEAD_TYPES
from .losses import LOSS_AVERAGES, LOSSES, NA_POLICIES, build_loss
from .metrics import THRESHOLD_RULES
from .model import ALL_STAGES, GEOMETRIES
from .shards import looks_like_shards
from .tracking import chosen_trackers


def is_stream(data: str | None, streaming: bool) -> bool:
    """Whether a run streams: --streaming, or --data naming shards (attrclf.shards)."""
    return bool(streaming) or looks_like_shards(data)

# Defaults of flags left unset: (with --data, for the demo). The demo trains from scratch on small images, so it
# takes bigger batches and a higher learning rate to finish in a few minutes on a CPU.
AUTO_DEFAULTS = {"image_size": (None, 48), "epochs": (30, 10), "batch_size": (32, 64), "lr": (2e-3, 3e-3)}
LATEST = "latest"  # --resume without a path
# what a command does rather than what the run computes: a --config file never sets it (train_config.json of a
# resumed run records --resume; repeating that run must not resume)
COMMAND_LINE_ONLY = ("resume",)


def _opt(help_text: str, default=None, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """Optimisation and data settings of one run; saved as train_config.json, never in config.json.

    `None` on pretrained / head_epochs / unfreeze_stages / lr_finetune / image_size / epochs / batch_size / lr
    means "decide from the run" (data or demo, pretrained or from scratch):
    see `resolve`.
    """

    data: str | None = _opt("labels.txt folder, image folder with metadata.csv/.jsonl, saved dataset or Hub dataset "
                            "id; omit to train on the embedded demo")
    images: str | None = _opt("images folder (default: DATA/images, else DATA)")
    labels: str | None = _opt("labels file (default: DATA/labels.txt)")
    label_columns: list[str] | None = _opt("attribute columns to train on (default: all)")
    group_column: str | None = _opt("column whose rows must stay on one side of the split (near-duplicates)")
    val_fraction: float = _opt("fraction of images for validation when the data has no validation split", 0.2)
    header: bool | None = _opt("labels.txt: --header reads its first row as the attribute names, --no-header as an "
                               "image's labels (default: decided from the rows; an uncertain first row stops the run)")
    labels_encoding: str | None = _opt("text encoding of labels.txt, e.g. latin-1 (default: UTF-8, BOM or not)")
    demo_size: int = _opt("number of images in the generated demo dataset", 3000)
    backbone: str = _opt("timm backbone name", "resnet18")
    pretrained: bool | None = _opt("start from the backbone's pretrained weights (timm download); "
                                   "default: on with --data, off for the demo")
    backbone_weights: str | None = _opt("local pretrained weights file for the backbone (no download)")
    image_size: int | None = _opt("square input size (default: the backbone's own; 48 for the demo)")
    head_hidden: int = _opt("hidden width of the head's MLP; 0 (default) = a single Linear on the pooled features, "
                            "which scored higher than a 128-wide hidden layer on the emoji benchmark and level to "
                            "higher on Tabler, with all labels and with half of them hidden (benchmarks/README.md, "
                            "fourteenth campaign)", 0)
    head_dropout: float = _opt("dropout before the head's first Linear", 0.5)
    hidden_dropout: float = _opt("dropout before the head's last Linear, after its hidden layer (--head-hidden above "
                                 "0)", 0.3)
    head: str = _opt("classification head: 'mlp' reads the pooled features; 'query' gives each attribute a learned "
                     "query that attends to the other attributes and to every position of the feature map",
                     "mlp", choices=list(HEAD_TYPES))
    query_dim: int = _opt("--head query: width of the attribute queries and of their attention", 256)
    query_heads: int = _opt("--head query: attention heads, which must divide --query-dim", 4)
    query_layers: int = _opt("--head query: number of decoder layers (self- then cross-attention)", 1)
    epochs: int | None = _opt("maximum number of epochs, early stopping may end sooner (default: 30; demo: 10)")
    batch_size: int | None = _opt("images per batch and process (default: 32; demo: 64)")
    lr: float | None = _opt("learning rate of the head, and of the whole network when training from scratch "
                            "(default: 2e-3; demo: 3e-3)")
    lr_finetune: float | None = _opt("learning rate of the unfrozen backbone stages (default: 3e-4 pretrained, "
                                     "--lr from scratch)")
    lr_layer_decay: float = _opt("layer-wise learning-rate decay: the backbone stage k stages below the last "
                                 "fine-tunes at --lr-finetune x this**k, so the early, generic stages move least "
                                 "(1 = every stage at --lr-finetune)", 1.0)
    weight_decay: float = _opt("AdamW weight decay (not applied to norms and biases)", 1e-2)
    drop_path: float = _opt("stochastic depth while training: each residual block of the backbone is skipped for an "
                            "image with a probability that rises with depth to this value at the last block (timm's "
                            "drop_path_rate; inference never drops; 0 = off)", 0.0)
    clip_grad: float = _opt("clip the gradient's global L2 norm to this value before every optimizer step, so a "
                            "batch whose rare positives carry a large pos_weight (up to --pos-weight-cap) moves the "
                            "weights no further than a typical batch; fine-tuning gradients of the benchmark "
                            "backbones run at norms of 5-15 with a tail past 100, so most steps are scaled (0 = off)",
                            5.0)
    head_epochs: int | None = _opt("epochs that train the head alone before unfreezing (default: 1 pretrained, "
                                   "0 from scratch)")
    unfreeze_stages: str | None = _opt("backbone stages to unfreeze after the head epochs: a number (1 = the last, "
                                       "stride 32, e.g. ResNet's layer4; 2 adds the stride-16 stage, layer3) or 'all', "
                                       "the whole backbone (default: 2 pretrained, all from scratch)")
    early_stop_patience: int = _opt("stop after this many epochs without a better validation mAP", 5)
    early_stop_anneal: int = _opt("when early stopping triggers, first anneal: the learning rate falls along a "
                                  "half cosine from where the schedule stands to its end value (a twentieth of "
                                  "the base) over this many more epochs, whose validations can still give the best "
                                  "epoch, then the run stops (0 = stop at once)", 3)
    loss: str = _opt("loss over known labels: bce, asl (asymmetric loss) or focal", "bce", choices=sorted(LOSSES))
    loss_average: str = _opt("how a batch's loss averages its known labels: 'entries' (every known label weighs the "
                             "same) or 'attributes' (each attribute's mean, then the mean over attributes: an "
                             "attribute with many NA weighs as much as one with none)", "entries",
                             choices=list(LOSS_AVERAGES))
    asl_gamma_neg: float = _opt("--loss asl: focusing exponent of negatives", 4.0)
    asl_gamma_pos: float = _opt("--loss asl: focusing exponent of positives", 0.0)
    asl_clip: float = _opt("--loss asl: probability margin; negatives with p below it give no loss", 0.05)
    focal_gamma: float = _opt("--loss focal: focusing exponent", 2.0)
    focal_alpha: float | None = _opt("--loss focal: weight of positives in [0, 1], negatives get 1 - alpha; "
                                     "None weighs both 1")
    na_policy: str = _opt("what the training loss does with NA labels: 'ignore' leaves them out, 'negative' counts "
                          "them as absent (the common baseline, for comparison; pos_weight then counts them as "
                          "negatives too), 'pseudo' adds the NA entries the model predicts confidently as "
                          "down-weighted pseudo-labels from the first fine-tuning epoch on (see --pseudo-*), "
                          "'selective' counts an NA entry as a down-weighted negative where its attribute is rare "
                          "and the model does not find it likely, after CSL (see --selective-*), 'teacher' gives "
                          "every NA entry the weight average's probability as a soft target, weighted by how sure it "
                          "is (a mean teacher; needs --ema-decay, see --teacher-weight), 'fixmatch' labels an NA "
                          "entry the model is sure of on the training view and learns that label on a stronger "
                          "view of the same image, from the first fine-tuning epoch on (FixMatch; see --fixmatch-*; "
                          "augments on the device). "
                          "Validation metrics and threshold tuning always skip NA", "ignore",
                          choices=list(NA_POLICIES))
    pseudo_low: float = _opt("--na-policy pseudo: an NA entry whose probability is at most this becomes a "
                             "pseudo-negative, the threshold relaxing linearly to this value over the fine-tuning "
                             "epochs", 0.05)
    pseudo_high: float = _opt("--na-policy pseudo: an NA entry whose probability is at least this becomes a "
                              "pseudo-positive, the threshold relaxing linearly to this value over the fine-tuning "
                              "epochs", 0.95)
    pseudo_weight: float = _opt("--na-policy pseudo: loss weight of a pseudo-label (a known label weighs 1)", 0.5)
    selective_max_prior: float = _opt("--na-policy selective: an attribute whose positive share among the known "
                                      "training labels is above this keeps its NA entries out of the loss", 0.3)
    selective_likely: float = _opt("--na-policy selective: an NA entry whose predicted probability is at least this "
                                   "stays out of the loss, as likely present", 0.5)
    selective_weight: float = _opt("--na-policy selective: loss weight of an NA entry counted as a negative (a known "
                                   "label weighs 1)", 0.5)
    teacher_weight: float = _opt("--na-policy teacher: loss weight of an NA entry the teacher is certain of (it "
                                 "falls to 0 as the teacher's probability nears 0.5; a known label weighs 1)", 0.5)
    fixmatch_threshold: float = _opt("--na-policy fixmatch: an NA entry whose probability on the weak view (pos_weight "
                                     "taken out) is at least this becomes a pseudo-positive (with "
                                     "--fixmatch-negatives, at most 1 minus this a pseudo-negative)", 0.95)
    fixmatch_weight: float = _opt("--na-policy fixmatch: weight of the pseudo-labels' term (their loss on the strong "
                                  "view over the batch's NA entries) beside the known labels' mean", 1.0)
    fixmatch_jitter: float = _opt("--na-policy fixmatch: colour jitter of the strong view (at least the usual view's "
                                  "--color-jitter; lower it where colour is what an attribute names)", 0.6)
    fixmatch_negatives: bool = _opt("--na-policy fixmatch: also make pseudo-negatives (default: pseudo-positives "
                                    "only, which did better on both benchmark sets)", False)
    fixmatch_pos_weight: bool = _opt("--na-policy fixmatch: the positive weight multiplies a pseudo-positive as it "
                                     "does a known positive (default: each weighs 1, so a wrong one costs no more "
                                     "than a wrong negative)", False)
    pos_weight_cap: float = _opt("upper bound of the per-attribute positive weight (negatives / positives): an "
                                 "attribute rarer than 1 in 11 has its positives weighed 10 times a negative, not "
                                 "fully compensated, so a few rare positives do not pull the shared layers off the "
                                 "rest (benchmarks/README.md, ninth campaign; 1 = no weighting)", 10.0)
    threshold_rule: str = _opt("how each attribute's threshold is tuned on the validation split: 'half-f1' = half the "
                               "best F1 reached there, as a probability with pos_weight taken out (the F1-optimal "
                               "threshold of calibrated probabilities; steady with few positives), 'max-f1' = the "
                               "probability at which F1 peaks there (lands on 0.99 or 0.01 when an attribute has a "
                               "handful of positives), 'auto' = half-f1 with --loss bce and no --balanced-sampler "
                               "(which leave the probabilities calibrated), else max-f1", "auto",
                               choices=["auto", *THRESHOLD_RULES])
    geometry: str = _opt("'whole': every image is resized whole to the input size, in training and evaluation "
                         "(nothing is cropped, so a small mark near the border stays in view: the multilabel "
                         "default); 'crop': timm's ImageNet geometry, random resized crops (--crop-scale) for "
                         "training and the backbone's centre crop for evaluation. Stored in config.json, so "
                         "prediction, evaluation, ONNX and the app use the same geometry", "whole",
                         choices=list(GEOMETRIES))
    crop_scale: float = _opt("--geometry crop: smallest area fraction of the random resized crop", 0.5)
    hflip: float = _opt("probability of a horizontal flip (0 when left/right matters)", 0.5)
    color_jitter: float = _opt("brightness/contrast/saturation jitter (hue never changes)", 0.3)
    random_erasing: float = _opt("probability of random erasing", 0.1)
    mixup: float = _opt("mixup: Beta(alpha, alpha) of the blend weight, 0 = off; a mixed label is known only where "
                        "both images' labels are known", 0.0)
    cutmix: float = _opt("CutMix: Beta(alpha, alpha) of the kept area, 0 = off; with --mixup too, each batch uses "
                         "one of the two (probability 0.5)", 0.0)
    balanced_sampler: bool = _opt("draw training images with replacement, each weighted by its rarest KNOWN positive "
                                  "attribute: weight = known / positives of that attribute (1 with no known positive), "
                                  "capped at --pos-weight-cap", False)
    head_feature_cache: bool = _opt("in the head-only stage, run the frozen backbone once per image (un-augmented) and "
                                    "train the head on the stored features: head epochs become nearly free, but the "
                                    "head overfits the fixed features and meets augmented images only at the switch "
                                    "(validation mAP then dips); off by default, so the head trains on augmented "
                                    "images at the cost of a frozen-backbone pass per image and epoch", False)
    switch_warmup: float = _opt("epochs over which both learning rates rise linearly from 0 after the switch to "
                                "fine-tuning, so the freshly unfrozen stage does not knock the trained head off its "
                                "features (0 = none)", 1.0)
    switch_warmup_head: bool = _opt("the head's learning rate warms up after the switch too; --no-switch-warmup-head "
                                    "warms up only the unfrozen backbone stages and lets the head, trained already, "
                                    "keep its schedule", True)
    freeze_bn_stats: bool = _opt("keep every BatchNorm's running statistics at their pretrained values while its "
                                 "stage fine-tunes (the weights still train); the statistics otherwise move towards "
                                 "the new data and the head meets shifted features after the switch", False)
    warm_bn_stats: bool = _opt("in the head stage, let the BatchNorm running statistics of the stages that fine-tuning "
                               "will unfreeze follow the data (their weights stay frozen), so the head learns on the "
                               "features it will meet after the switch and validation mAP no longer falls there; "
                               "--no-warm-bn-stats keeps the pretrained statistics until the switch. No effect with "
                               "--head-feature-cache (its features are computed once) or --freeze-bn-stats", True)
    ema_decay: float = _opt("keep an exponential moving average of the weights (timm ModelEmaV3, decay warmed up "
                            "from 0 towards this value); each epoch validates both the raw and the averaged "
                            "weights and the better is kept (0 = off)", 0.9998)
    mixed_precision: str = _opt("'auto' (bf16 on GPUs and on CPUs with AVX512-BF16 or AMX, else fp32), 'no', 'bf16' "
                                "or 'fp16'", "auto", choices=["auto", "no", "bf16", "fp16"])
    channels_last: bool = _opt("NHWC memory format for convolutional backbones (faster oneDNN / cuDNN kernels)", True)
    num_workers: int | None = _opt("DataLoader worker processes (default: one per spare CPU core, at most 4 on CPU, "
                                   "8 with a GPU)")
    cpu_threads: int | None = _opt("torch threads per process, on CPU and beside a GPU (default on CPU: the cores "
                                   "divided among the processes, as `accelerate launch` sets OMP_NUM_THREADS=1, which "
                                   "would leave cores idle; on a GPU: torch's own)")
    seed: int = _opt("random seed (split, initialisation, augmentation, order)", 42)
    max_steps: int | None = _opt("stop after this many optimiser steps (smoke runs)")
    output_dir: str = _opt("where the model and reports are written", "outputs")
    keep_checkpoints: int = _opt("full training-state checkpoints kept in OUTPUT/checkpoints, one written after each "
                                 "epoch (the last K stay; 0 = none); removed once the run has written its outputs", 2)
    resume: str | None = _opt("continue an interrupted run from the latest checkpoint in OUTPUT/checkpoints, or from "
                              "the checkpoint folder PATH", nargs="?", const=LATEST, metavar="PATH")
    folds: int | None = _opt("k-fold cross-validation: K models, fold k validating the one trained on the other "
                             "folds (grouped by --group-column); writes OUTPUT/fold_1..fold_K and "
                             "OUTPUT/cv_summary.json")
    push_to_hub: str | None = _opt("Hub model repo (namespace/name) to push the trained model folder to, from the "
                                   "main process, once training ends")
    hub_private: bool = _opt("create the --push-to-hub repo private", False)
    license: str = _opt("license in the model card (check your data's and the backbone weights' terms)",
                        "apache-2.0")
    dataset_id: str | None = _opt("Hub dataset id named in the model card; when unset, --data if it is one")
    # data path at scale (attrclf.decodecache, attrclf.device_augment)
    decode_cache: bool = _opt("decode each image once into a uint8 cache at the working size (numpy memmap shards) "
                              "and read it in every epoch, run, fold and process; --no-decode-cache decodes every "
                              "image in every epoch", True)
    cache_dir: str | None = _opt("folder of the decoded-image cache (default: $ATTRCLF_CACHE/decoded, else "
                                 "~/.cache/attrclf/decoded)")
    augment_on: str = _opt("where training augmentation runs: 'device' augments whole uint8 batches on the training "
                           "device (GPU, else CPU), 'loader' runs timm's per-image transforms in the loader workers; "
                           "'auto': device on a GPU, loader on a CPU (benchmarks/README.md)", "auto",
                           choices=["auto", "device", "loader"])
    # streaming sources and tracking (attrclf.streaming, attrclf.shards, attrclf.tracking)
    streaming: bool = _opt("stream --data (a Hub dataset id or dataset folder whose data files are .tar / .parquet "
                           "shards) instead of loading it; --data naming shards (*.tar / *.parquet, a glob or a "
                           "folder, local or fsspec) always streams. A stream is step-based: --max-steps, "
                           "--eval-every", False)
    shuffle_buffer: int = _opt("streaming: rows in the shuffle buffer of each process (it also shuffles the shard "
                               "order each pass); 1 = no shuffling", 10000)
    val_data: str | None = _opt("streaming: validation data (shards or any --data source), read once; default: the "
                                "first --val-rows rows of the shards, held out of training")
    val_rows: int = _opt("streaming: rows held out for validation from the start of the shards (without --val-data)",
                         2000)
    stats_rows: int = _opt("streaming: training rows, from the start, whose label counts give pos_weight", 10000)
    eval_every: int = _opt("streaming: optimiser steps between validations (one epoch of the loop: schedule, "
                           "checkpoints and early stopping count in these)", 1000)
    report_to: str = _opt("experiment tracker(s): tensorboard (OUTPUT/tracking/), wandb, mlflow, all (the installed "
                          "ones) or none", "none", choices=["none", "tensorboard", "wandb", "mlflow", "all"])

    def resolve(self) -> "TrainConfig":
        """A copy with every automatic default decided and the values checked."""
        cfg = copy.deepcopy(self)
        for name, (with_data, for_demo) in AUTO_DEFAULTS.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, with_data if cfg.data else for_demo)
        from_scratch = not (cfg.backbone_weights or cfg.pretrained or (cfg.pretrained is None and cfg.data))
        cfg.pretrained = bool(cfg.backbone_weights) or not from_scratch
        if cfg.head_epochs is None:
            cfg.head_epochs = 0 if from_scratch else 1
        if cfg.unfreeze_stages is None:
            cfg.unfreeze_stages = ALL_STAGES if from_scratch else "2"
        if cfg.lr_finetune is None:
            cfg.lr_finetune = cfg.lr if from_scratch else 3e-4
        if cfg.num_workers is None:
            cfg.num_workers = min(8 if torch.cuda.is_available() else 4, max(0, (os.cpu_count() or 1) - 1))
        if is_stream(cfg.data, cfg.streaming):
            if not cfg.max_steps:
                raise AttrclfError("a stream has no known length: give --max-steps (and --eval-every, the steps "
                                   "between validations)")
            cfg.epochs = math.ceil(cfg.max_steps / max(1, cfg.eval_every))  # one loop epoch = --eval-every steps
        if cfg.dataset_id is None and cfg.data and is_hub_id(cfg.data) and not is_stream(cfg.data, False):
            cfg.dataset_id = cfg.data  # a Hub dataset id: the card links it
        cfg.check()
        return cfg

    def unused_flags(self) -> list[str]:
        """One warning per flag given a value other than its default that this run does not read, because it
        belongs to a head, loss, NA policy, geometry or mode the run does not use (e.g. --fixmatch-threshold without
        --na-policy fixmatch, --hidden-dropout with the default one-Linear head). The run goes on."""
        defaults = {f.name: f.default for f in fields(self)}
        warnings = []
        for name in defaults:
            value = getattr(self, name)
            if value == defaults[name] or not (reason := self._unused_reason(name)):
                continue
            flag = f"--{name.replace('_', '-')}"
            if isinstance(value, bool):
                flag = flag if value else f"--no-{flag[2:]}"
            else:
                flag = f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"
            warnings.append(f"{flag} is unused: {reason}")
        return warnings

    def _unused_reason(self, name: str) -> str | None:
        """Why the setting `name` has no effect in this run, or None when the run reads it."""
        if name in ("head_hidden", "head_dropout", "hidden_dropout") and self.head == "query":
            return "it belongs to --head mlp, and this run trains --head query"
        if name.startswith("query_") and self.head != "query":
            return f"it sizes --head query, and this run trains --head {self.head}"
        if name == "hidden_dropout" and not self.head_hidden:
            return ("it acts on the MLP head's hidden layer, which the default head (one Linear) does not have; add "
                    "--head-hidden N for one")
        for policy in ("pseudo", "selective", "teacher", "fixmatch"):
            if name.startswith(policy + "_") and self.na_policy != policy:
                return f"it tunes --na-policy {policy}, and this run uses --na-policy {self.na_policy}"
        for loss in ("asl", "focal"):
            if name.startswith(loss + "_") and self.loss != loss:
                return f"it tunes --loss {loss}, and this run uses --loss {self.loss}"
        if name == "crop_scale" and self.geometry != "crop":
            return f"it sizes the random crops of --geometry crop, and this run uses --geometry {self.geometry}"
        if name == "hub_private" and not self.push_to_hub:
            return "it applies to the repo that --push-to-hub creates, and this run pushes nothing"
        if name in ("shuffle_buffer", "val_data", "val_rows", "stats_rows", "eval_every") and not is_stream(
                self.data, self.streaming):
            return "it applies to streamed data (--streaming, or --data naming .tar / .parquet shards)"
        return None

    def check(self) -> None:
        """Raise AttrclfError, naming the flag, for a value no run can use."""
        if self.unfreeze_stages != ALL_STAGES and not str(self.unfreeze_stages).isdigit():
            raise AttrclfError(f"--unfreeze-stages must be a number or 'all' (got '{self.unfreeze_stages}')")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise AttrclfError(f"--{name.replace('_', '-')} must be at least 1")
        if self.head_epochs < 0 or self.early_stop_patience < 1 or self.early_stop_anneal < 0:
            raise AttrclfError("--head-epochs and --early-stop-anneal must be >= 0 and --early-stop-patience >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise AttrclfError("--max-steps must be at least 1")
        if self.image_size is not None and self.image_size < 8:  # 0 would silently mean the default
            raise AttrclfError(f"--image-size must be at least 8 pixels (got {self.image_size})")
        if self.mixup < 0 or self.cutmix < 0:
            raise AttrclfError(f"--mixup and --cutmix must be >= 0, 0 = off (got {self.mixup:g}, {self.cutmix:g})")
        if self.na_policy not in NA_POLICIES:
            raise AttrclfError(f"--na-policy must be one of {', '.join(NA_POLICIES)} (got '{self.na_policy}')")
        if not 0 <= self.drop_path < 1:  # also catches nan
            raise AttrclfError(f"--drop-path must be in [0, 1), 0 = off (got {self.drop_path:g})")
        if not self.clip_grad >= 0:  # also catches nan
            raise AttrclfError(f"--clip-grad must be >= 0, 0 = off (got {self.clip_grad:g})")
        if not self.pos_weight_cap >= 1:  # also catches nan; below 1 the bounds [1/cap, cap] cross
            raise AttrclfError(f"--pos-weight-cap must be >= 1, 1 = no positive weighting "
                               f"(got {self.pos_weight_cap:g})")
        if self.switch_warmup < 0:
            raise AttrclfError(f"--switch-warmup must be >= 0 epochs, 0 = none (got {self.switch_warmup:g})")
        if not 0 < self.lr_layer_decay <= 1:
            raise AttrclfError(f"--lr-layer-decay must be in (0, 1], 1 = off (got {self.lr_layer_decay:g})")
        if not 0 <= self.ema_decay < 1:
            raise AttrclfError(f"--ema-decay must be in [0, 1), 0 = off (got {self.ema_decay:g})")
        if not (0 <= self.pseudo_low < self.pseudo_high <= 1 and 0 < self.pseudo_weight <= 1):
            raise AttrclfError(f"--na-policy pseudo needs 0 <= --pseudo-low < --pseudo-high <= 1 and 0 < "
                               f"--pseudo-weight <= 1 (got {self.pseudo_low:g}, {self.pseudo_high:g}, "
                               f"{self.pseudo_weight:g})")
        if self.na_policy == "teacher" and not self.ema_decay:
            raise AttrclfError("--na-policy teacher needs the weight average that labels the NA entries: drop "
                               "--ema-decay 0 (or choose another --na-policy)")
        if not 0 <= self.fixmatch_jitter < 1:
            raise AttrclfError(f"--fixmatch-jitter must be in [0, 1) (got {self.fixmatch_jitter:g})")
        if not (0.5 < self.fixmatch_threshold <= 1 and self.fixmatch_weight > 0):
            raise AttrclfError(f"--na-policy fixmatch needs --fixmatch-threshold in (0.5, 1] and --fixmatch-weight > 0 "
                               f"(got {self.fixmatch_threshold:g}, {self.fixmatch_weight:g})")
        if self.na_policy == "fixmatch" and (self.mixup or self.cutmix):
            raise AttrclfError("--na-policy fixmatch labels each image from its own weak view, which --mixup / "
                               "--cutmix blend with another: drop them (or choose another --na-policy)")
        if self.na_policy == "fixmatch" and self.augment_on == "loader":
            raise AttrclfError("--na-policy fixmatch makes its two views of each image from the same uint8 rows on the "
                               "training device: drop --augment-on loader (or choose another --na-policy)")
        if not 0 < self.teacher_weight <= 1:
            raise AttrclfError(f"--teacher-weight must be in (0, 1] (got {self.teacher_weight:g})")
        if not (0 <= self.selective_max_prior <= 1 and 0 < self.selective_likely <= 1
                and 0 < self.selective_weight <= 1):
            raise AttrclfError(f"--na-policy selective needs --selective-max-prior in [0, 1] and "
                               f"--selective-likely and --selective-weight in (0, 1] (got "
                               f"{self.selective_max_prior:g}, {self.selective_likely:g}, {self.selective_weight:g})")
        if self.keep_checkpoints < 0:
            raise AttrclfError("--keep-checkpoints must be 0 (no checkpoints) or more")
        if self.folds is not None and self.folds < 2:
            raise AttrclfError(f"--folds must be at least 2 (got {self.folds})")
        if self.folds and self.push_to_hub:
            raise AttrclfError("--push-to-hub cannot be combined with --folds (K models): push the fold you want with "
                               "`python -m attrclf.hub push OUTPUT/fold_k ID`")
        if self.folds and self.resume not in (None, LATEST):
            raise AttrclfError("--resume PATH cannot be combined with --folds: use --resume alone, it finds each "
                               "fold's latest checkpoint")
        query_ok = self.query_heads >= 1 and self.query_layers >= 1 and self.query_dim % self.query_heads == 0
        if self.head == "query" and not query_ok:
            raise AttrclfError(f"--query-dim ({self.query_dim}) must be a multiple of --query-heads "
                               f"({self.query_heads}), and --query-layers ({self.query_layers}) at least 1")
        build_loss(self.loss, **self.loss_options())  # the loss checks its own settings
        self.check_streaming()
        chosen_trackers(self.report_to)  # an uninstalled tracker: say which package, before anything starts

    def check_streaming(self) -> None:
        """The streaming flags' values, and the features a stream cannot offer."""
        for name in ("shuffle_buffer", "val_rows", "stats_rows", "eval_every"):
            if getattr(self, name) < 1:
                raise AttrclfError(f"--{name.replace('_', '-')} must be at least 1")
        if not is_stream(self.data, self.streaming):
            return
        for name in ("balanced_sampler", "head_feature_cache", "folds"):
            if getattr(self, name):
                raise AttrclfError(f"--{name.replace('_', '-')} needs the whole dataset in memory; it cannot be "
                                   f"combined with a stream (--streaming or shards in --data)")
        if self.na_policy == "fixmatch":
            raise AttrclfError("--na-policy fixmatch makes two views of each image from the decoded rows on the "
                               "training device, which a stream (--streaming or shards in --data) augments in its "
                               "own pool: choose another --na-policy")

    def loss_options(self) -> dict:
        """The --asl-* / --focal-* settings of the chosen loss, as keyword arguments of its class."""
        average = {"average": self.loss_average}
        if self.loss == "asl":
            return {"gamma_neg": self.asl_gamma_neg, "gamma_pos": self.asl_gamma_pos, "clip": self.asl_clip, **average}
        if self.loss == "focal":
            return {"gamma": self.focal_gamma, "alpha": self.focal_alpha, **average}
        return average

    @property
    def tuning_rule(self) -> str:
        """--threshold-rule with 'auto' decided: half-f1 where the probabilities stay calibrated, else max-f1."""
        if self.threshold_rule != "auto":
            return self.threshold_rule
        return "half-f1" if self.loss == "bce" and not self.balanced_sampler else "max-f1"

    @property
    def unfreeze(self) -> int | str:
        """--unfreeze-stages as the model takes it: a number of stages, or "all"."""
        return ALL_STAGES if self.unfreeze_stages == ALL_STAGES else int(self.unfreeze_stages)


# ---------------------------------------------------------------- command line


def field_kind(name: str) -> str:
    """How a TrainConfig field is given on the command line: "bool" (--x / --no-x), "list" (--x A B) or "value"."""
    kind = typing.get_type_hints(TrainConfig)[name]
    if kind is bool or bool in typing.get_args(kind):
        return "bool"
    if typing.get_origin(kind) is list or list[str] in typing.get_args(kind):
        return "list"
    return "value"


def build_parser() -> argparse.ArgumentParser:
    """argparse from TrainConfig: one --flag-name per field, its help from the field's metadata; plus --config."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a timm backbone for multilabel attributes (1 / 0 / NA). "
        "Run with `accelerate launch train.py [flags]`; with no --data it trains on the embedded demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of these settings (the field names: "
                        "batch_size, lr, ...), e.g. a run's train_config.json to repeat it; flags given here win")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        options = {"help": f.metadata["help"], "default": None if f.default is MISSING else f.default}
        options.update({k: f.metadata[k] for k in ("choices", "nargs", "const", "metavar") if k in f.metadata})
        kind = field_kind(f.name)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif kind == "list":
            parser.add_argument(flag, nargs="+", metavar="NAME", **options)
        else:
            hint = hints[f.name]
            base = next((t for t in (int, float, str) if t is hint or t in typing.get_args(hint)), str)
            parser.add_argument(flag, type=base, **options)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the command line; with `--config FILE`, the file's settings under the flags given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--config")
    path = early.parse_known_args(argv)[0].config
    file_flags = config_file_flags(path) if path else []
    values = vars(build_parser().parse_args([*file_flags, *argv]))  # argparse: the last occurrence of a flag wins
    values.pop("config")
    return TrainConfig(**values)


def read_config_file(path: str | Path) -> dict:
    """The settings in a YAML or JSON file: a mapping of TrainConfig field names (or flag names) to values."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise AttrclfError(f"--config: cannot read '{path}': {e.strerror or e}") from None
    try:
        settings = _parse(text, json_file=path.suffix.lower() == ".json")
    except ValueError as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise AttrclfError(f"--config: '{path}' is not valid {kind}: {e}") from None
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise AttrclfError(f"--config: '{path}' must hold a mapping of settings (name: value), "
                           f"not a {type(settings).__name__}")
    settings = {str(key).replace("-", "_"): value for key, value in settings.items()}
    unknown = sorted(set(settings) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise AttrclfError(f"--config: '{path}' has unknown setting(s) {', '.join(unknown)}; the settings are "
                           f"TrainConfig's fields, named like the flags (batch_size or batch-size for --batch-size)")
    return settings


def config_file_flags(path: str | Path) -> list[str]:
    """The file's settings as the flags that would set them, checked as if typed (argparse's message, file named).

    A null value leaves the setting at its default; --resume is read from the command line only.
    """
    settings = read_config_file(path)
    flags = []
    for name, value in settings.items():
        if value is None or name in COMMAND_LINE_ONLY:
            if value is not None:
                print(f"note: --config: '{name}' is taken from the command line only; the file's "
                      f"{value!r} is ignored", file=sys.stderr)
            continue
        flags += _as_flags(name, value, path)

    def file_error(message: str) -> typing.NoReturn:
        raise AttrclfError(f"--config '{path}': {message}")

    checker = build_parser()
    checker.error = file_error  # a bad value names the file; argparse's own message says what is wrong
    checker.parse_args(flags)
    return flags


def _parse(text: str, json_file: bool):
    if json_file:
        return json.loads(text)
    import yaml  # only --config with a YAML file needs it

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def _as_flags(name: str, value, path) -> list[str]:
    """The flags that set `name` to a file's `value` (bools as --x / --no-x, lists as --x A B, else --x=VALUE)."""
    flag, kind = "--" + name.replace("_", "-"), field_kind(name)
    if kind == "bool" and isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if kind == "list" and isinstance(value, list):
        return [flag, *map(str, value)]
    if isinstance(value, dict | list):
        raise AttrclfError(f"--config '{path}': {flag} takes one value, not {value!r}")
    return [f"{flag}={value}"]  # argparse converts and checks it as if typed (a bool field rejects "=value")
