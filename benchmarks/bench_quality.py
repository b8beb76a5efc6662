"""Quality on real data, scored on a held-out TEST split: attrclf variants vs the seed recipe, over several seeds.

    python -m benchmarks.prepare_emoji && python -m benchmarks.prepare_tabler && python -m benchmarks.prepare_weights
    python -m benchmarks.bench_quality --dataset emoji|tabler [--seeds 0 1 2] [--variant NAME=TRAIN_FLAGS ...]
        [--jobs 2] [--epochs 12] [--image-size 128] [--limit-groups 0]

The data set is split once, grouped (base emoji / base icon) and with a fixed seed that no training seed changes, into
train+validation and TEST. Every training sees only the train+validation labels: train.py makes its own grouped
validation split from them (by its --seed), and the seed recipe (benchmarks/seed_baseline.py) is handed the same
validation images as a list. Each run stops early, picks its best epoch and (attrclf) tunes thresholds on that
validation split only; then attrclf's saved folder is loaded with `attrclf.Predictor` and the seed recipe writes its
best model's probabilities, both on the TEST images, and attrclf.metrics scores them: mAP, per-attribute AP, macro-F1
at 0.5, at the run's own thresholds (attrclf: config.json's, tuned on validation; seed: 0.5, as the seed does) and
cross-fitted on the test images (tuned on one half, scored on the other; attrclf by its run's --threshold-rule).

Runs: each `--variant NAME=FLAGS` (train.py flags; `default=` is today's defaults) and the seed recipe (`seed`), each
with the full labels and with a further `--hide` (50%) of the known TRAINING labels hidden (validation and test
untouched), each for every `--seeds` value. `--jobs 2` runs two trainings at once with `--threads` (cores / jobs)
torch threads each. A finished run's bench_result.json is reused when the same run (recipe, a hash of its code, flags,
seed, epochs, size, backbone, the exact label / validation / test lists) is asked for again, so a campaign can be split
across sessions; a change in attrclf/ or train.py reruns the attrclf runs. "attrclf before" is the same command in a
checkout of the earlier commit with its own --out-dir.

Writes benchmarks/results/quality_TAG/ (runs/, split files), quality_TAG.json and quality_TAG_curves.png (per-epoch
validation mAP of every run), TAG = dataset, groups, epochs and size; with --out-dir DIR, DIR.json and DIR_curves.png
beside DIR.
"""

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from attrclf import Predictor
from attrclf.fileio import atomic_write_json
from attrclf.metrics import evaluate_predictions

from .common import DATASETS, RESULTS, WEIGHTS, LabelTable, grouped_split, hide_training_labels, machine

REPO = Path(__file__).resolve().parent.parent
SEED_RECIPE = "seed"
LABEL_SETS = ("full", "hidden")
TEST_BACKEND = "torch"  # fp32: the same weights always give the same TEST figures (see score_test)


@dataclass
class Split:
    """The files a run trains on: train+validation labels (full or hidden), and what only the scorer sees."""

    trainval: LabelTable
    test: LabelTable
    test_list: Path
    labels_files: dict  # (label set, seed) -> labels file
    val_lists: dict  # seed -> validation image list (train.py's own split, mirrored)


@dataclass
class RunSpec:
    variant: str
    label_set: str
    seed: int
    flags: list[str] | None  # train.py flags; None for the seed recipe
    labels_file: Path
    val_list: Path
    dir: Path

    @property
    def name(self) -> str:
        return f"{self.variant} {self.label_set} s{self.seed}"


@dataclass
class RunResult:
    """One run's bench_result.json (reused on a rerun with an equal key)."""

    key: dict
    test: dict  # evaluate_predictions on the test images
    curve: list  # per epoch: {"epoch", "stage", "val_mAP", "elapsed"}
    best_epoch: int
    epochs_run: int
    train_seconds: float
    wall_seconds: float
    split_check: str | None = None  # attrclf: does metrics.json's validation split match the mirrored one?
    extra: dict = field(default_factory=dict)
    # attrclf's TEST predictions: "torch" (fp32) since 2026-12-04; "auto" before, which could pick bf16 by timing
    test_backend: str = "auto"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def code_hash(recipe: str) -> str:
    """Hash of the code a recipe runs (working tree): a changed attrclf or seed recipe never reuses an old result."""
    files = [REPO / "benchmarks" / "seed_baseline.py"] if recipe == SEED_RECIPE else \
        [REPO / "train.py", *sorted((REPO / "attrclf").rglob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def make_split(args, out: Path) -> Split:
    """Test split (fixed), train+validation labels, and per seed the validation list and the hidden-labels file."""
    data_dir, _ = DATASETS[args.dataset]
    if not (data_dir / "labels.txt").is_file():
        sys.exit(f"error: {data_dir}/labels.txt not found: run python -m benchmarks.prepare_{args.dataset} first")
    table_all = LabelTable.read(data_dir / "labels.txt")
    if args.limit_groups:
        groups = sorted(set(table_all.groups()))
        keep = set(np.random.default_rng(args.test_seed).permutation(groups)[: args.limit_groups])
        table_all = LabelTable(table_all.header, [r for r in table_all.rows if r[-1] in keep])
    in_test = grouped_split(table_all.groups(), args.test_fraction, args.test_seed)
    names = np.array(table_all.names())
    test, trainval = table_all.select(set(names[in_test])), table_all.select(set(names[~in_test]))
    test_list = out / "test.txt"
    test_list.write_text("\n".join(test.names()) + "\n")
    labels_files = {}
    val_lists = {}
    full = trainval.write(out / "trainval_full.txt")
    for seed in args.seeds:
        in_val = grouped_split(trainval.groups(), args.val_fraction, seed)
        val_names = set(np.array(trainval.names())[in_val])
        val_lists[seed] = out / f"val_s{seed}.txt"
        val_lists[seed].write_text("\n".join(n for n in trainval.names() if n in val_names) + "\n")
        labels_files["full", seed] = full
        labels_files["hidden", seed] = hide_training_labels(trainval, val_names, args.hide, seed).write(
            out / f"trainval_hidden_s{seed}.txt")
    return Split(trainval, test, test_list, labels_files, val_lists)


def run_key(args, spec: RunSpec, split: Split) -> dict:
    """What makes two runs the same run (threads and jobs do not: they change speed, not what is learned)."""
    recipe = SEED_RECIPE if spec.flags is None else "attrclf"
    return {"recipe": recipe, "code": code_hash(recipe), "flags": spec.flags, "seed": spec.seed,
            "epochs": args.epochs, "image_size": args.image_size, "backbone": args.backbone,
            "labels": sha(spec.labels_file), "val": sha(spec.val_list), "test": sha(split.test_list),
            "weights": args.weights.name}


def common_flags(args, spec: RunSpec, group_column: str) -> list[str]:
    data_dir, _ = DATASETS[args.dataset]
    return ["--data", str(data_dir), "--labels", str(spec.labels_file), "--images", str(data_dir / "images"),
            "--group-column", group_column, "--backbone", args.backbone, "--backbone-weights", str(args.weights),
            "--epochs", str(args.epochs), "--seed", str(spec.seed), "--image-size", str(args.image_size)]


def run_command(command: list[str], log: Path) -> float:
    """Runs it with its output in log; returns the wall seconds; raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(command)}\nfailed (exit {code}); {log}:\n{tail}")
    return time.perf_counter() - start


def train_attrclf(args, spec: RunSpec, split: Split, group_column: str) -> RunResult:
    model_dir = spec.dir / "model"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher = accelerate if args.launcher == "accelerate" else [sys.executable]
    command = [*launcher, "train.py", *common_flags(args, spec, group_column), "--output-dir", str(model_dir),
               "--cpu-threads", str(args.threads), *spec.flags]
    wall = run_command(command, spec.dir / "train.log")
    metrics = json.loads((model_dir / "metrics.json").read_text())
    history = json.loads((model_dir / "history.json").read_text())["epochs"]
    elapsed = np.cumsum(history["seconds"]).tolist()
    curve = [{"epoch": e, "stage": s, "val_mAP": m, "val_mAP_ema": a, "elapsed": t}
             for e, s, m, a, t in zip(history["epoch"], history["stage"], history["val_mAP"], history["val_mAP_ema"],
                                      elapsed, strict=True)]
    return RunResult(run_key(args, spec, split), score_test(args, split, model_dir), curve, metrics["best_epoch"],
                     metrics["epochs_run"], metrics["train_seconds"], wall, split_check(metrics, split, spec),
                     test_backend=TEST_BACKEND)


def score_test(args, split: Split, model_dir: Path) -> dict:
    """attrclf's saved model on the TEST images, in fp32 torch (TEST_BACKEND): `auto` would time torch against
    torch-bf16 at load and could take either, and bf16 moves some probabilities by tenths (emoji: 0.47 at most, 5%
    of entries by more than 0.05), so the same weights scored up to 0.3 points apart."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    predictor = Predictor.from_pretrained(str(model_dir), device="cpu", backend=TEST_BACKEND)
    test_paths = [DATASETS[args.dataset][0] / "images" / name for name in split.test.names()]
    probs = predictor.predict_probs(test_paths, batch_size=64)
    targets = split.test.targets()
    # the cross-fitted F1 tunes on test halves the way this run tuned its thresholds (runs before the rule: max-f1)
    rule = {"rule": metrics.get("threshold_rule", "max-f1"), "pos_weight": list(metrics["pos_weight"].values())}
    return evaluate_predictions(probs, targets == 1, targets >= 0, split.test.label_names, predictor.thresholds(),
                                **rule)


def rescore(args, spec: RunSpec, split: Split) -> RunResult:
    """--rescore: a finished attrclf run's saved model scored again on TEST in fp32 (its key and curve kept), for runs
    scored before the backend was pinned; a run without a saved result or model is an error."""
    path, model_dir = spec.dir / "bench_result.json", spec.dir / "model"
    if spec.flags is None or not path.is_file() or not (model_dir / "model.safetensors").is_file():
        raise RuntimeError(f"--rescore: {spec.name} has no finished attrclf run with a saved model in {spec.dir}")
    result = RunResult(**json.loads(path.read_text()))
    before = result.test["mAP"]
    result = replace(result, test=score_test(args, split, model_dir), test_backend=TEST_BACKEND)
    atomic_write_json(path, asdict(result), indent=1)
    print(f"rescored {spec.name}: test mAP {before:.4f} -> {result.test['mAP']:.4f} ({TEST_BACKEND})", flush=True)
    return result


def split_check(metrics: dict, split: Split, spec: RunSpec) -> str:
    """'ok' when train.py validated on the images the seed recipe was handed (same count and per-attribute counts)."""
    val = split.trainval.select(set(spec.val_list.read_text().split()))
    labels = LabelTable.read(spec.labels_file).select(set(val.names()))
    targets = labels.targets()
    expected = {n: {"positive": int((targets[:, a] == 1).sum()), "negative": int((targets[:, a] == 0).sum()),
                    "na": int((targets[:, a] == -1).sum())} for a, n in enumerate(labels.label_names)}
    data = metrics["data"]
    if data["validation_images"] == len(val.rows) and data["validation_counts"] == expected:
        return "ok"
    return f"MISMATCH: train.py validated on {data['validation_images']} images, the seed recipe on {len(val.rows)}"


def train_seed(args, spec: RunSpec, split: Split, group_column: str) -> RunResult:
    command = [sys.executable, "-m", "benchmarks.seed_baseline", *common_flags(args, spec, group_column),
               "--val-list", str(spec.val_list), "--test-list", str(split.test_list), "--threads", str(args.threads),
               "--out-dir", str(spec.dir)]
    wall = run_command(command, spec.dir / "train.log")
    result = json.loads((spec.dir / "result.json").read_text())
    predictions = np.load(spec.dir / "test_predictions.npz")
    if list(predictions["names"]) != split.test.names():
        raise RuntimeError(f"{spec.dir}: test predictions are not in the test list's order")
    targets = split.test.targets()
    test = evaluate_predictions(predictions["probs"], targets == 1, targets >= 0, split.test.label_names,
                                [0.5] * len(split.test.label_names))
    curve = [{"epoch": r["epoch"], "stage": r["stage"], "val_mAP": r["val_mAP"], "elapsed": r["elapsed"]}
             for r in result["history"]]
    return RunResult(run_key(args, spec, split), test, curve, result["best_epoch"], len(curve),
                     curve[-1]["elapsed"], wall)


def run_or_reuse(args, spec: RunSpec, split: Split) -> RunResult:
    """The run's result.json when its key matches (resume), else train, score and write it."""
    key = run_key(args, spec, split)
    path = spec.dir / "bench_result.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            print(f"reused  {spec.name} ({path})", flush=True)
            return RunResult(**saved)
    spec.dir.mkdir(parents=True, exist_ok=True)
    print(f"started {spec.name}", flush=True)
    group_column = DATASETS[args.dataset][1]
    result = (train_seed if spec.flags is None else train_attrclf)(args, spec, split, group_column)
    atomic_write_json(path, asdict(result), indent=1)
    print(f"done    {spec.name}: test mAP {result.test['mAP']} in {result.wall_seconds:.0f} s", flush=True)
    return result


def parse_variants(values: list[str]) -> dict[str, list[str]]:
    variants = {}
    for value in values or ["default="]:
        name, sep, flags = value.partition("=")
        if not sep or not name or name == SEED_RECIPE:
            sys.exit(f"error: --variant '{value}': expected NAME=TRAIN_FLAGS with NAME not '{SEED_RECIPE}'")
        variants[name] = shlex.split(flags)
    return variants


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="emoji")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (the test split stays)")
    parser.add_argument("--variant", action="append", metavar="NAME=FLAGS",
                        help="attrclf run with these extra train.py flags (repeat); default: 'default='")
    parser.add_argument("--no-seed-recipe", dest="seed_recipe", action="store_false", help="skip the seed recipe runs")
    parser.add_argument("--label-sets", nargs="+", choices=LABEL_SETS, default=list(LABEL_SETS))
    parser.add_argument("--hide", type=float, default=0.5, help="fraction of known training labels hidden")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training (default: cores / jobs)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--limit-groups", type=int, default=0, help="use this many groups, test included (0: all)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--test-seed", type=int, default=20261201, help="seed of the test split (fixed)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="train.py's --val-fraction (its default)")
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results/quality_TAG")
    parser.add_argument("--rescore", action="store_true",
                        help="score the finished attrclf runs' saved models again on TEST in fp32 (no training)")
    args = parser.parse_args(argv)
    args.variants = parse_variants(args.variant)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    args.tag = f"{args.dataset}_g{args.limit_groups or 'all'}_e{args.epochs}_px{args.image_size}"
    args.out_dir = args.out_dir or RESULTS / f"quality_{args.tag}"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch  # scoring runs in this process, beside the trainings: keep it to its share of the cores

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(args, args.out_dir)
    print(f"{args.dataset}: {len(split.trainval.rows)} train+validation / {len(split.test.rows)} test images "
          f"({len(set(split.test.groups()))} test groups, test seed {args.test_seed}); {args.jobs} jobs x "
          f"{args.threads} threads; machine {machine()}", flush=True)
    recipes = {**args.variants, **({SEED_RECIPE: None} if args.seed_recipe else {})}
    specs = [RunSpec(variant, label_set, seed, flags, split.labels_files[label_set, seed], split.val_lists[seed],
                     args.out_dir / "runs" / f"{label_set}-{variant}-s{seed}")
             for label_set in args.label_sets for seed in args.seeds for variant, flags in recipes.items()]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(rescore if args.rescore else run_or_reuse, args, s, split) for s in specs]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:  # the finished runs are saved: the same command resumes after the fix
        sys.exit("error: " + "\n\nerror: ".join(str(e) for e in failed))
    results = {s.name: f.result() for s, f in zip(specs, futures, strict=True)}
    print(f"all runs: {time.perf_counter() - start:.0f} s wall")
    from .quality_report import report

    report(args, split, specs, results)


if __name__ == "__main__":
    main()
