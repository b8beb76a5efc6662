"""Signals as a scheduler or a terminal sends them, to real training processes: one line, a checkpoint of the step,
no outputs written, no process left behind, and --resume equal to a run that was never stopped (attrclf.preemption)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from .conftest import OUTPUT_FILES, REPO, write_labels_dataset

pytestmark = pytest.mark.slow  # every test here trains in subprocesses

STOPPED = "stopped by {} at epoch {} step {}: checkpoint {} written; continue with the same command plus --resume " \
          "(nothing else in {} was replaced)"


@pytest.fixture(scope="module")
def steady_data(tmp_path_factory):
    """480 images (360 train at batch 4: 90 steps an epoch, about 1 s on a quiet machine), so a signal lands inside an
    epoch."""
    lines = ["img a b c grp"] + [f"i{n:03d}.png {n % 2} {(n // 2) % 2} {'NA' if n % 5 == 0 else int(n % 3 == 0)} "
                                 f"g{n // 3}" for n in range(480)]
    return write_labels_dataset(tmp_path_factory.mktemp("steady") / "data", lines)


def arguments(data, out, workers):
    return ["--data", str(data), "--backbone", "test_resnet", "--image-size", "48", "--batch-size", "4",
            "--no-pretrained", "--cpu-threads", "1", "--group-column", "grp", "--val-fraction", "0.25", "--epochs",
            "3", "--num-workers", str(workers), "--output-dir", str(out)]


def launch(processes):
    if not processes:
        return [sys.executable, str(REPO / "train.py")]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
            "--mixed_precision", "no", *(["--multi_gpu"] if processes > 1 else []), "--num_processes", str(processes),
            str(REPO / "train.py")]


def environment(tmp_path):
    return {**os.environ, "ATTRCLF_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1",
            "PYTHONPATH": str(REPO)}


def run_to_end(command, tmp_path):
    result = subprocess.run(command, capture_output=True, text=True, env=environment(tmp_path), cwd=tmp_path,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def stop_mid_epoch(command, tmp_path, out, *, signum, target="process"):
    """Start `command`, wait for the first epoch's checkpoint, signal `target` inside epoch 2; returns (exit code,
    stderr, seconds from the signal to the end, the processes the run had, how many of them were ranks)."""
    process = subprocess.Popen(command, env=environment(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = out / "checkpoints" / "epoch_0001" / "training_state.json"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # inside epoch 2 (90 steps of 10-20 ms, more on a loaded machine)
    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    ranks = [p for p in family[1:] if "train.py" in " ".join(p.cmdline())]  # the launcher's children
    sent = time.time()
    if target == "group":
        os.killpg(process.pid, signum)  # what a terminal's Ctrl-C does
    elif target == "rank 1":
        os.kill(ranks[-1].pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)  # the pipe closes when the last process holding it has ended
    return process.returncode, stderr, time.time() - sent, family, len(ranks)


def assert_nothing_left(family):
    time.sleep(0.5)
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(p.cmdline()) for p in alive]


def mid_epoch_checkpoint(out):
    (checkpoint,) = [p for p in (out / "checkpoints").iterdir() if "_step_" in p.name]
    assert checkpoint.name.startswith("epoch_0001_step_")  # 1 epoch done, stopped inside the second
    return checkpoint


def assert_same_run(whole, resumed):
    a, b = (json.loads((d / "history.json").read_text()) for d in (whole, resumed))
    assert len(b["iterations"]["loss"]) == len(a["iterations"]["loss"])
    np.testing.assert_allclose(b["iterations"]["loss"], a["iterations"]["loss"], atol=1e-6)
    assert b["epochs"]["train_loss"] == pytest.approx(a["epochs"]["train_loss"], abs=1e-6)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    for name in ("loss", "mAP", "f1_macro_tuned"):
        assert abs(mb["validation"][name] - ma["validation"][name]) < 1e-5, name
    wa, wb = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-6


@pytest.mark.parametrize(("signum", "workers"), [(signal.SIGTERM, 1), (signal.SIGINT, 0)])
def test_a_signal_mid_epoch_checkpoints_that_step_and_resume_equals_an_uninterrupted_run(tmp_path, steady_data,
                                                                                       signum, workers):
    whole, out = tmp_path / "whole", tmp_path / "stopped"
    run_to_end([*launch(0), *arguments(steady_data, whole, workers)], tmp_path)
    (out / "model.safetensors").parent.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"an earlier run's model")  # must stay as it is

    command = [*launch(0), *arguments(steady_data, out, workers)]
    code, stderr, seconds, family, _ = stop_mid_epoch(command, tmp_path, out, signum=signum, target="group")
    assert code == 128 + signum and seconds < 30
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    checkpoint = mid_epoch_checkpoint(out)
    step = int(checkpoint.name.split("_")[-1])
    assert 90 < step < 180
    lines = [line for line in stderr.splitlines() if line.startswith("stopped")]
    assert lines == [STOPPED.format(signal.Signals(signum).name, 2, step, checkpoint, out)]
    assert stderr.rstrip().splitlines()[-1] == lines[0]
    assert sorted(os.listdir(out)) == ["checkpoints", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"an earlier run's model"
    assert_nothing_left(family)

    (out / "model.safetensors").unlink()
    result = run_to_end([*launch(0), *arguments(steady_data, out, workers), "--resume"], tmp_path)
    assert f"resumed from {checkpoint}: 1 epoch(s) and {step} step(s) done" in result.stdout
    assert sorted(os.listdir(out)) == OUTPUT_FILES
    assert_same_run(whole, out)


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_and_leaves_no_orphan(tmp_path, steady_data):
    """accelerate launch with 2 gloo ranks: SIGTERM to the launcher only. The ranks stop at the same step and write
    one checkpoint; attrclf prints one line (torch's launcher adds its own SignalException report); nothing is left
    running; --resume on 2 ranks equals an uninterrupted 2-rank run."""
    whole, out = tmp_path / "whole", tmp_path / "stopped"
    run_to_end([*launch(2), *arguments(steady_data, whole, 0)], tmp_path)
    code, stderr, seconds, family, ranks = stop_mid_epoch([*launch(2), *arguments(steady_data, out, 0)], tmp_path, out,
                                                   signum=signal.SIGTERM)
    assert code != 0 and seconds < 60
    assert ranks == 2
    checkpoint = mid_epoch_checkpoint(out)
    assert sorted(p.name for p in checkpoint.glob("replay_rng_*.json")) == ["replay_rng_0.json", "replay_rng_1.json"]
    lines = [line for line in stderr.splitlines() if line.startswith("stopped")]
    step = int(checkpoint.name.split("_")[-1])
    assert lines == [STOPPED.format("SIGTERM", 2, step, checkpoint, out)]
    assert "attrclf" not in stderr.split(lines[0])[-1]  # what follows is the launcher's own report, not ours
    assert sorted(os.listdir(out)) == ["checkpoints"]
    assert_nothing_left(family)

    run_to_end([*launch(2), *arguments(steady_data, out, 0), "--resume"], tmp_path)
    assert_same_run(whole, out)


def test_killing_the_launcher_stops_its_rank_instead_of_leaving_an_orphan(tmp_path, steady_data):
    """SIGKILL to a one-process accelerate launch: the rank follows its parent (PR_SET_PDEATHSIG), checkpoints and
    ends; before, it trained on and overwrote the outputs."""
    out = tmp_path / "stopped"
    code, stderr, seconds, family, ranks = stop_mid_epoch([*launch(1), *arguments(steady_data, out, 1)], tmp_path, out,
                                                   signum=signal.SIGKILL)
    assert code == -signal.SIGKILL and seconds < 30
    checkpoint = mid_epoch_checkpoint(out)
    assert [line for line in stderr.splitlines() if line.startswith("stopped")] == [
        STOPPED.format("SIGTERM", 2, int(checkpoint.name.split("_")[-1]), checkpoint, out)]
    assert "Traceback" not in stderr
    assert sorted(os.listdir(out)) == ["checkpoints"]
    assert_nothing_left(family)
