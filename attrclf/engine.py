"""The training loop on an Accelerator: setup, the two stages, train_one_epoch / evaluate, early stopping.

`train_and_save` is one run from data to output folder: build the model, `fit` it (resuming from a checkpoint if asked),
`reporting.finalize` the best epoch, write the outputs. Each epoch validates with the loss and mAP only; the full
metric suite runs once, on the best epoch.
"""

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from . import demo, preemption
from .augment import BatchMixer
from .checkpoints import (
    RandomState,
    Replay,
    checkpoint_root,
    contiguous_state,
    load_ema,
    read_checkpoint,
    read_replay,
    resume_point,
    save_checkpoint,
)
from .config import TrainConfig, is_stream
from .decodecache import augment_on, data_path, decode_cache
from .device_augment import strong_view
from .ema import make_ema, update_ema
from .headcache import CachedHeadStage, uses_feature_cache
from .labels import compute_pos_weight, label_counts, training_counts
from .loader import DecodeFailures, balanced_sample_weights, make_loader
from .losses import PseudoLabeller, SelectiveNegatives, TeacherTargets, ViewPseudoLabels, apply_na_policy, build_loss
from .model import ALL_STAGES, AttrClassifier, AttrConfig
from .optim import current_lrs, lr_factor, make_optimizer, set_lrs, stage_at
from .outputs import check_space, sweep, writing
from .reporting import finalize, fmt, progress, summary_table, write_outputs
from .sources import AttrData, prepare_data
from .splits import data_fingerprint
from .state import BestEpoch, EpochRecord, FitResult, RunState, ValidationResult
from .streaming import StreamData, describe_stream, gather_states, prepare_stream, restore_state, stream_loader
from .tracking import epoch_values, step_values
from .transforms import eval_transform, train_transform


def load_training_data(cfg: TrainConfig, accelerator: Accelerator) -> AttrData:
    """The user's data, or the demo (generated once into the cache, by the main process first)."""
    data = cfg.data
    if is_stream(data, cfg.streaming):
        return prepare_stream(cfg)  # shards or --streaming: attrclf.streaming
    if data is None:
        with accelerator.main_process_first():
            data = str(demo.ensure_demo(cfg.demo_size))
        accelerator.print(
            f"No --data given: training on the embedded demo dataset ({cfg.demo_size} generated images, "
            f"attributes {', '.join(demo.LABEL_NAMES)}) from {data}"
        )
    return prepare_data(data, images=cfg.images, labels=cfg.labels, label_columns=cfg.label_columns,
                        group_column=cfg.group_column, header=cfg.header, labels_encoding=cfg.labels_encoding,
                        val_fraction=cfg.val_fraction, seed=cfg.seed,
                        decode_cache=decode_cache(cfg, accelerator))


def build_model(cfg: TrainConfig, label_names: list[str]) -> AttrClassifier:
    config = AttrConfig.for_backbone(
        cfg.backbone,
        label_names,
        image_size=cfg.image_size,
        geometry=cfg.geometry,
        head_hidden=cfg.head_hidden,
        head_dropout=cfg.head_dropout,
        hidden_dropout=cfg.hidden_dropout,
        head_type=cfg.head,
        query_dim=cfg.query_dim,
        query_heads=cfg.query_heads,
        query_layers=cfg.query_layers,
    )
    return AttrClassifier(config, pretrained=cfg.pretrained and not cfg.backbone_weights,
                          backbone_weights=cfg.backbone_weights, drop_path=cfg.drop_path)


def training_batch(cfg: TrainConfig, augment=None):
    """(pixels, targets, mask[, sizes]) -> the batch after the device augmentation (attrclf.device_augment, when it
    runs there), --na-policy, then --mixup / --cutmix: training batches only."""
    mixer = BatchMixer(cfg.mixup, cfg.cutmix) if cfg.mixup or cfg.cutmix else None

    def prepare(pixel_values, targets, mask, *sizes):
        if augment is not None:
            pixel_values = augment(pixel_values, *sizes)
        targets, mask = apply_na_policy(targets, mask, cfg.na_policy)
        return mixer(pixel_values, targets, mask) if mixer else (pixel_values, targets, mask)

    return prepare


NALabeller = PseudoLabeller | SelectiveNegatives | TeacherTargets | ViewPseudoLabels


def na_labeller(cfg: TrainConfig, epoch: int, priors: torch.Tensor | None = None,
                pos_weight: torch.Tensor | None = None) -> NALabeller | None:
    """The labeller of NA entries for `epoch` (0-based), called after the forward pass; None under "ignore" and
    "negative". "pseudo": its thresholds on the curriculum over the fine-tuning epochs, none in the head stage (the
    head's first guesses are poor). "selective": every epoch, with the training split's priors. "teacher": every
    epoch (the weight average starts as the pretrained model plus the first head steps and follows from there).
    "fixmatch": in the fine-tuning epochs (the strong view needs the backbone training). The pseudo-labels'
    thresholds and the teacher's targets apply to probabilities with the loss's `pos_weight` taken out
    (losses.unweighted_probs)."""
    if cfg.na_policy == "teacher":
        return TeacherTargets(weight=cfg.teacher_weight, pos_weight=pos_weight)
    if cfg.na_policy == "selective":
        return SelectiveNegatives(priors, max_prior=cfg.selective_max_prior, likely=cfg.selective_likely,
                                  weight=cfg.selective_weight)
    if cfg.na_policy not in ("pseudo", "fixmatch") or stage_at(epoch, cfg) != "finetune":
        return None
    if cfg.na_policy == "fixmatch":
        return ViewPseudoLabels(threshold=cfg.fixmatch_threshold, weight=cfg.fixmatch_weight, pos_weight=pos_weight,
                                negatives_too=cfg.fixmatch_negatives, weigh_positives=cfg.fixmatch_pos_weight)
    return PseudoLabeller.for_epoch(epoch - cfg.head_epochs, cfg.epochs - cfg.head_epochs, low=cfg.pseudo_low,
                                    high=cfg.pseudo_high, weight=cfg.pseudo_weight, pos_weight=pos_weight)


def selective_priors(data: AttrData, cfg: TrainConfig) -> torch.Tensor | None:
    """(A,) positive share of the known training labels, which --na-policy selective needs (None otherwise)."""
    if cfg.na_policy != "selective":
        return None
    return torch.tensor(label_counts(data.train["labels"], len(data.label_names)).positive_share)


def report_na_labels(labeller: NALabeller, accelerator: Accelerator) -> None:
    """The epoch's counts of labelled NA entries over every process, in one log line."""
    totals = accelerator.reduce(torch.tensor(labeller.tallies(), device=accelerator.device), reduction="sum")
    accelerator.print(labeller.summary(totals.tolist()))


def train_one_epoch(model, loader, optimizer, loss_fn, *, accelerator: Accelerator, state: RunState,
                    cfg: TrainConfig, epoch: int, ema=None, priors: torch.Tensor | None = None,
                    augment=None, strong=None, replay: Replay | None = None) -> float:
    """One pass over the training loader; appends per-iteration losses to state.history and folds each step into
    the weight average `ema` (attrclf.ema) when there is one; `priors` (A,) are the known training labels' positive
    shares, which --na-policy selective needs; `augment` augments uint8 batches on the device, and `strong` makes
    the second, stronger view of the same uint8 batch that --na-policy fixmatch learns its pseudo-labels on (both
    views go through the model in one forward pass, so BatchNorm sees them together). Returns the mean
    loss. `replay` skips the steps a mid-epoch checkpoint had trained; a stop signal ends it at a step boundary
    (attrclf.preemption)."""
    model.train()
    prepare = training_batch(cfg, augment)
    pseudo = na_labeller(cfg, epoch, priors, getattr(loss_fn, "pos_weight", None))
    steps_per_epoch = len(loader)
    done = [loss for loss, e in zip(state.history.iterations.loss, state.history.iterations.epoch, strict=True)
            if e == epoch + 1]  # trained before a mid-epoch checkpoint
    total, count = sum(done), len(done)
    bar = progress(loader, accelerator, f"epoch {epoch + 1}/{cfg.epochs} [{stage_at(epoch, cfg)}]")
    before_fetch = RandomState.capture()  # what a mid-epoch checkpoint needs to draw the same next batch (Replay)
    two_views = isinstance(pseudo, ViewPseudoLabels)
    for batch in (replay.skip(bar) if replay else bar):
        pixel_values, targets, mask = prepare(*batch)
        set_lrs(optimizer, cfg, lr_factor(state.step, steps_per_epoch, cfg, anneal=state.anneal),
                lr_factor(state.step, steps_per_epoch, cfg, part="head", anneal=state.anneal))
        if two_views:  # the stronger view of the same uint8 rows, through the model with the weak one
            logits, strong_logits = model(torch.cat([pixel_values, strong(batch[0], *batch[3:])])).chunk(2)
        else:
            logits = model(pixel_values)
        weight = None
        if pseudo is not None and not two_views:  # NA entries the model (or the teacher) decides on join the loss
            source = teacher_logits(ema, pixel_values, accelerator) if cfg.na_policy == "teacher" else logits
            targets, mask, weight = pseudo(source, targets, mask)
        loss = loss_fn(logits, targets, mask, weight)
        if two_views:  # FixMatch's term: what the weak view is sure of, learnt on the strong view
            loss = loss + pseudo.term(loss_fn, logits, strong_logits, mask)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        state.step += 1
        update_ema(ema, accelerator.unwrap_model(model), state.step)
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        total, count = total + value, count + 1
        state.record_step(epoch, value)
        accelerator.log(step_values(value, current_lrs(optimizer)), step=state.step)  # --report-to (else a no-op)
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if cfg.max_steps and state.step >= cfg.max_steps:
            break
        preemption.check(accelerator, before_fetch)
        before_fetch = RandomState.capture()
    if pseudo is not None:
        report_na_labels(pseudo, accelerator)
    return total / max(count, 1)


@torch.no_grad()
def teacher_logits(ema, pixel_values: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """The weight average's logits for a training batch (--na-policy teacher), in eval mode (running BatchNorm
    statistics, no dropout: the teacher's best guess)."""
    with accelerator.autocast():
        return ema.module(pixel_values).float()


@torch.no_grad()
def evaluate(model, loader, loss_fn, accelerator: Accelerator) -> ValidationResult:
    """Loss over known labels, and (N, A) probs / targets / mask of the whole validation set, gathered once."""
    model.eval()
    all_logits, all_targets, all_masks = [], [], []
    for pixel_values, targets, mask in progress(loader, accelerator, "validate"):
        preemption.check(accelerator)  # a stop signal: the checkpoint resumes with this validation
        with accelerator.autocast():  # a prepared model has it already; the weight average (attrclf.ema) has not
            logits = model(pixel_values)
        logits, targets, mask = accelerator.gather_for_metrics((logits.float(), targets, mask))
        all_logits.append(logits)
        all_targets.append(targets)
        all_masks.append(mask.bool())
    return ValidationResult.from_logits(torch.cat(all_logits), torch.cat(all_targets), torch.cat(all_masks), loss_fn)


# ---------------------------------------------------------------- the loop


@dataclass
class TrainingParts:
    """One run's pieces before `accelerator.prepare` wraps them; the failures count images that break mid-training."""

    model: AttrClassifier
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    train_failures: DecodeFailures
    val_failures: DecodeFailures
    pos_weight: torch.Tensor
    head_stage: CachedHeadStage | None = None
    ema: torch.nn.Module | None = None  # timm ModelEmaV3: the moving average of the weights (attrclf.ema)
    priors: torch.Tensor | None = None  # (A,) positive share of the known training labels (--na-policy selective)
    device_augment: object = None  # device_augment.DeviceAugment under --augment-on device
    strong_augment: object = None  # its stronger view (device_augment.strong_view) under --na-policy fixmatch


@dataclass
class Prepared:
    """The parts as `accelerator.prepare` wrapped them for one stage."""

    stage: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader


def setup_training(model: AttrClassifier, data: AttrData, cfg: TrainConfig, accelerator: Accelerator) -> TrainingParts:
    """Loss with the training split's pos_weight (the same on every process: the split is seeded), loaders and
    optimizer."""
    num_labels = len(data.label_names)
    pos_weight, warnings = compute_pos_weight(training_counts(data.train["labels"], num_labels, cfg.na_policy),
                                              data.label_names, cfg.pos_weight_cap)
    for message in warnings:
        accelerator.print(f"warning: {message}")
    loss_fn = build_loss(cfg.loss, pos_weight, **cfg.loss_options()).to(accelerator.device)
    sample_weights = (balanced_sample_weights(data.train["labels"], num_labels, cfg.pos_weight_cap)
                      if cfg.balanced_sampler else None)
    train_failures = DecodeFailures(data.train["image_name"])
    val_failures = DecodeFailures(data.validation["image_name"])
    options = dict(crop_scale=cfg.crop_scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter,
                   random_erasing=cfg.random_erasing)
    augment, evaluation = train_transform(model.config, **options), eval_transform(model.config)
    stream = isinstance(data, StreamData)  # a stream of shards (attrclf.streaming) augments in its own pool
    path = data_path(model.config, data.decoded, augment_on="loader" if stream else augment_on(cfg, accelerator),
                     train_transform=augment, eval_transform=evaluation, augment_options=options,
                     channels_last=cfg.channels_last, failures=train_failures)
    if stream:
        train_loader = stream_loader(data, augment, cfg, accelerator)
        train_failures = train_loader.failures
    else:
        train_loader = make_loader(data.train, augment, cfg.batch_size, True, num_workers=cfg.num_workers,
                                   seed=cfg.seed, sample_weights=sample_weights, failures=train_failures,
                                   channels_last=cfg.channels_last and path.augment is None, rows=path.train_rows)
    val_loader = make_loader(data.validation, evaluation, cfg.batch_size, False, num_workers=cfg.num_workers,
                             failures=val_failures, channels_last=cfg.channels_last, rows=path.val_rows)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer's parameters stay the same objects
    model.frozen_bn_stats = cfg.freeze_bn_stats
    model.warm_bn_stages = cfg.unfreeze if cfg.warm_bn_stats and not uses_feature_cache(cfg) else 0
    head_stage = CachedHeadStage(data, cfg) if uses_feature_cache(cfg) else None
    return TrainingParts(model, loss_fn, make_optimizer(model, cfg), train_loader, val_loader,
                         train_failures=train_failures, val_failures=val_failures, pos_weight=pos_weight,
                         head_stage=head_stage, ema=make_ema(model, cfg, accelerator.device),
                         device_augment=path.augment,
                         strong_augment=(strong_view(path.augment, cfg.fixmatch_jitter) if cfg.na_policy == "fixmatch"
                                         else None),
                         priors=selective_priors(data, cfg))


def prepare_stage(accelerator: Accelerator, parts: TrainingParts, cfg: TrainConfig, stage: str, *,
                  prepared: Prepared | None = None) -> Prepared:
    """Make the stage's parameters trainable, then wrap the parts with `accelerator.prepare` (again).

    DistributedDataParallel registers only the parameters that require grad when it wraps the model: a parameter
    unfrozen later would train on each process's own gradients, unsynchronised, and the processes would drift apart.
    So a stage switch releases the old wrappers and prepares afresh. One process has no wrapper to renew.
    The accelerator is emptied first: its `save_state` must hold this run's parts and nothing else.
    """
    parts.model.set_trainable(0 if stage == "head" else cfg.unfreeze)
    if prepared is not None and prepared.model is parts.model:
        return replace(prepared, stage=stage)
    if prepared is not None:
        accelerator.unwrap_model(prepared.model, keep_fp32_wrapper=False)  # prepare adds the autocast wrapper again
    accelerator.free_memory()
    return Prepared(stage, *accelerator.prepare(parts.model, parts.optimizer, parts.train_loader, parts.val_loader))


def seed_epoch(cfg: TrainConfig, epoch: int, accelerator: Accelerator, parts: TrainingParts) -> None:
    """Seeds from (--seed, epoch): a resumed epoch shuffles, augments and drops out exactly like an uninterrupted one.

    The loader's generator (sample order, worker seeds) gets the same seed on every process; the global generators
    (augmentation without workers, dropout) get it plus the process index.
    """
    seed = int(np.random.SeedSequence([cfg.seed, epoch]).generate_state(1)[0]) % 2**31
    parts.train_loader.generator.manual_seed(seed)
    set_seed(seed, device_specific=True)


def fit(model: AttrClassifier, data: AttrData, cfg: TrainConfig, accelerator: Accelerator, *,
        resume_from: Path | None = None) -> FitResult:
    """Two-stage training with early stopping on validation mAP; keeps the best epoch's weights.

    After every epoch the whole training state goes to OUTPUT/checkpoints (see `checkpoints.save_checkpoint`);
    `resume_from`, one of those checkpoints, continues the run exactly where it stopped.
    """
    parts = setup_training(model, data, cfg, accelerator)
    fingerprint = data_fingerprint(data)
    run, best = RunState(), None
    if resume_from is not None:
        run, best = read_checkpoint(resume_from, fingerprint, cfg, accelerator)
    prepared = prepare_stage(accelerator, parts, cfg, stage_at(run.epoch, cfg))
    replay = None
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        load_ema(resume_from, parts.ema)
        if isinstance(data, StreamData):  # the stream's own state says where it stopped: no batches to replay
            restore_state(parts.train_loader, run.stream, accelerator)  # each process's shard + row offset
        else:
            replay = read_replay(resume_from, run, accelerator)
        accelerator.print(f"resumed from {resume_from}: {run.epoch} epoch(s) and {run.step} step(s) done")
    with preemption.training_loop(cfg.output_dir):
        try:
            while run.epoch < cfg.epochs and run.stop is None:
                stage = stage_at(run.epoch, cfg)
                if run.epoch > 0 and stage != stage_at(run.epoch - 1, cfg):
                    run.since_best = 0  # the new stage gets its own patience
                    what = ("the whole backbone" if cfg.unfreeze == ALL_STAGES
                            else f"the last {cfg.unfreeze} backbone stage(s)")
                    accelerator.print(f"stage 2: unfreezing {what} at lr {cfg.lr_finetune:g}")
                if stage != prepared.stage:
                    prepared = prepare_stage(accelerator, parts, cfg, stage, prepared=prepared)
                seed_epoch(cfg, run.epoch, accelerator, parts)
                best = run_epoch(prepared, parts, cfg, accelerator, run=run, best=best, replay=replay)
                replay, checkpoint = None, None
                if cfg.keep_checkpoints:
                    if isinstance(data, StreamData):
                        run.stream = gather_states(parts.train_loader, accelerator)
                    checkpoint = save_checkpoint(accelerator, run, best, fingerprint=fingerprint, cfg=cfg,
                                                 ema=parts.ema)
                preemption.check(accelerator, checkpoint=checkpoint)
        except preemption.StopRequested as request:  # every process stops at this step
            if isinstance(data, StreamData):
                run.stream = gather_states(parts.train_loader, accelerator)
            raise stop_here(request, accelerator, run, best, cfg=cfg, fingerprint=fingerprint, ema=parts.ema) from None
        finally:
            if isinstance(data, StreamData):
                parts.train_loader.close()  # the stream's iterators closed here, whatever ended the loop
    accelerator.unwrap_model(prepared.model).to(memory_format=torch.contiguous_format)  # safetensors saves contiguous
    run.history.best_epoch = best.epoch
    return FitResult(run.history, best, epochs_run=run.epoch, stopped_early=run.stop == "early_stopping",
                     seconds=run.seconds, pos_weight=parts.pos_weight.tolist(), decode_failures=run.decode_failures,
                     world_size=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
                     resumed_from=str(resume_from) if resume_from else None)


def stop_here(request: preemption.StopRequested, accelerator: Accelerator, run: RunState, best: BestEpoch | None, *,
              cfg: TrainConfig, fingerprint: str, ema=None) -> Exception:
    """Checkpoint the step a stop signal ended training at (unless the epoch's checkpoint was just written, or there
    are none: --keep-checkpoints 0); returns the `Stopped` that ends the command with one line."""
    checkpoint = request.checkpoint
    if checkpoint is None and cfg.keep_checkpoints:
        checkpoint = save_checkpoint(accelerator, run, best, fingerprint=fingerprint, cfg=cfg, ema=ema,
                                     before_fetch=request.before_fetch)
    epoch = run.epoch + (1 if run.steps_into_epoch() else 0)
    return preemption.stopped(request, epoch=epoch, step=run.step, checkpoint=checkpoint, output_dir=cfg.output_dir,
                              main=accelerator.is_main_process)


def run_epoch(prepared: Prepared, parts: TrainingParts, cfg: TrainConfig, accelerator: Accelerator, *,
              run: RunState, best: BestEpoch | None, replay: Replay | None = None) -> BestEpoch:
    """Train one epoch, validate (loss and mAP), record it, update early stopping; returns the best epoch so far."""
    epoch, start = run.epoch, time.time()
    if parts.head_stage is not None and prepared.stage == "head":
        train_loss, validations = parts.head_stage.run_epoch(
            prepared.model, prepared.optimizer, prepared.val_loader, parts.loss_fn, accelerator=accelerator,
            state=run, epoch=epoch, ema=parts.ema)
    else:
        train_loss = train_one_epoch(prepared.model, prepared.train_loader, prepared.optimizer, parts.loss_fn,
                                     accelerator=accelerator, state=run, cfg=cfg, epoch=epoch, ema=parts.ema,
                                     priors=parts.priors, augment=parts.device_augment,
                                     strong=parts.strong_augment, replay=replay)
        validations = {"raw": evaluate(prepared.model, prepared.val_loader, parts.loss_fn, accelerator)}
        if parts.ema is not None:
            validations["ema"] = evaluate(parts.ema.module, prepared.val_loader, parts.loss_fn, accelerator)
    failed = take_decode_failures(parts, accelerator)
    maps = {name: validation.mean_ap() for name, validation in validations.items()}
    scores = {name: (maps[name] if maps[name] is not None else -v.loss) for name, v in validations.items()}
    weights = max(scores, key=lambda name: (scores[name], name == "raw"))  # the raw weights win a tie
    improved = best is None or scores[weights] > best.score + 1e-6
    lrs, seconds = current_lrs(prepared.optimizer), time.time() - start
    record = EpochRecord(epoch=epoch + 1, stage=prepared.stage, train_loss=train_loss,
                         val_loss=validations["raw"].loss, val_mAP=maps["raw"], val_mAP_ema=maps.get("ema"),
                         lr_head=lrs.get("head"),
                         lr_backbone=lrs.get("backbone") if prepared.stage == "finetune" else 0.0,
                         seconds=round(seconds, 2), bad_images=len(failed))
    run.history.epochs.append(record)
    report_epoch(record, cfg, accelerator, improved=improved, failed=failed)
    if accelerator.trackers:  # --report-to
        accelerator.log(epoch_values(record, validations["raw"], parts.model.config.label_names), step=run.step)
    for name in failed:
        run.decode_failures[name] = run.decode_failures.get(name, 0) + 1
    if improved:
        source = prepared.model if weights == "raw" else parts.ema.module
        best = keep_best(source, validations[weights], accelerator, score=scores[weights], epoch=epoch + 1,
                         weights=weights)
    run.since_best = 0 if improved else run.since_best + 1
    run.epoch, run.seconds = epoch + 1, run.seconds + seconds
    run.stop = stop_reason(run, cfg, accelerator)
    return best


def keep_best(model, validation: ValidationResult, accelerator: Accelerator, *, score: float, epoch: int,
              weights: str = "raw") -> BestEpoch:
    """A CPU copy of the weights (contiguous: safetensors stores no channels_last), with the validation output;
    `weights` says whether they are the raw or the averaged ones."""
    return BestEpoch(score=score, epoch=epoch, val_loss=validation.loss,
                     state=contiguous_state(accelerator.unwrap_model(model)), probs=validation.probs,
                     targets=validation.targets, mask=validation.mask, weights=weights)


def report_epoch(record: EpochRecord, cfg: TrainConfig, accelerator: Accelerator, *, improved: bool,
                 failed: list[str]) -> None:
    """The epoch's log line, and the images that failed to decode in it."""
    more = ""
    if failed:
        more = (f"\n  {len(failed)} image(s) failed to decode and were left out: {', '.join(failed[:5])}"
                f"{' ...' if len(failed) > 5 else ''}")
    accelerator.print(
        f"epoch {record.epoch}/{cfg.epochs} [{record.stage}] train_loss {record.train_loss:.4f}  "
        f"val_loss {record.val_loss:.4f}  val_mAP {fmt(record.val_mAP, 4)}"
        f"{f' (ema {fmt(record.val_mAP_ema, 4)})' if record.val_mAP_ema is not None else ''}  ({record.seconds:.0f}s)"
        f"{'  * best' if improved else ''}{more}"
    )


def stop_reason(run: RunState, cfg: TrainConfig, accelerator: Accelerator) -> str | None:
    """Why training ends after the epoch just done ("max_steps", "early_stopping"), or None to go on.

    After --early-stop-patience epochs without a better validation mAP (in the last stage), the run stops at once
    with --early-stop-anneal 0; otherwise it first anneals: `run.anneal` bends the learning rate down to the
    schedule's floor over the next --early-stop-anneal epochs (or the epochs left, if fewer), whose validations can
    still give the best epoch, and the run stops after them.
    """
    if cfg.max_steps and run.step >= cfg.max_steps:
        accelerator.print(f"reached --max-steps {cfg.max_steps}")
        return "max_steps"
    if run.anneal is not None:
        if run.epoch < run.anneal["epoch"] + run.anneal["epochs"]:
            return None
        accelerator.print(f"early stopping: the learning rate annealed over {run.anneal['epochs']} epoch(s) after "
                          f"{cfg.early_stop_patience} without a better validation mAP")
        return "early_stopping"
    in_last_stage = stage_at(run.epoch - 1, cfg) == stage_at(cfg.epochs - 1, cfg)
    if run.since_best < cfg.early_stop_patience or not in_last_stage or run.epoch >= cfg.epochs:
        return None
    if cfg.early_stop_anneal:
        epochs = min(cfg.early_stop_anneal, cfg.epochs - run.epoch)
        run.anneal = {"step": run.step, "epoch": run.epoch, "epochs": epochs}
        accelerator.print(f"no better validation mAP for {run.since_best} epochs: annealing the learning rate over "
                          f"the next {run.anneal['epochs']} epoch(s), then stopping")
        return None
    accelerator.print(f"early stopping: no better validation mAP for {run.since_best} epochs")
    return "early_stopping"


def take_decode_failures(parts: TrainingParts, accelerator: Accelerator) -> list[str]:
    """Images that failed to decode this epoch on any process, each named once."""
    failed = parts.train_failures.take() + parts.val_failures.take()
    return sorted(set(gather_object(failed))) if accelerator.num_processes > 1 else sorted(set(failed))


def prepare_output_dir(cfg: TrainConfig, model: AttrClassifier, accelerator: Accelerator) -> None:
    """Before the first step: room on the disk for the model and its checkpoints, and no temporary folders left by
    an interrupted write (attrclf.outputs)."""
    check_space(cfg.output_dir, sum(t.numel() for t in model.state_dict().values()), cfg.keep_checkpoints)
    if accelerator.is_main_process:
        for stale in sweep(cfg.output_dir):
            accelerator.print(f"removed {stale}: a temporary folder an interrupted write left behind")
    accelerator.wait_for_everyone()


def train_and_save(cfg: TrainConfig, data: AttrData, accelerator: Accelerator) -> dict:
    """Build, train (or resume), finalize and write one model to cfg.output_dir; returns its metrics.json content."""
    resume_from = resume_point(cfg)
    set_seed(cfg.seed)
    model = build_model(cfg, data.label_names)
    accelerator.print(
        f"model: {cfg.backbone} ({'pretrained' if cfg.pretrained else 'from scratch'}), input "
        f"{model.config.input_size[1]}px; stages: head {cfg.head_epochs} epoch(s), then unfreeze "
        f"{cfg.unfreeze_stages}; device {accelerator.device}, world size {accelerator.num_processes} "
        f"(process(es) x batch {cfg.batch_size}), mixed precision {accelerator.mixed_precision}, "
        f"{torch.get_num_threads()} thread(s) each"
    )
    prepare_output_dir(cfg, model, accelerator)
    result = fit(model, data, cfg, accelerator, resume_from=resume_from)
    metrics = finalize(model, result, data, cfg)
    if isinstance(data, StreamData):
        describe_stream(metrics, data, cfg, steps=len(result.history.iterations.step), world_size=result.world_size)
    if accelerator.is_main_process:
        with writing("the model and reports", cfg.output_dir):
            written = write_outputs(model, metrics, result, cfg=cfg, output_dir=Path(cfg.output_dir))
        shutil.rmtree(checkpoint_root(cfg.output_dir), ignore_errors=True)  # the run is complete: nothing to resume
        accelerator.print(summary_table(metrics))
        accelerator.print(f"saved to {cfg.output_dir}/: {', '.join(written)}")
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return metrics
