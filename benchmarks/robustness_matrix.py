"""The bad-input matrix: each case run as a new user would, `python -m attrclf ...` in a fresh folder on generated tiny
data; records the message (stderr's last line), the exit code, whether a traceback appeared and what was kept.

    python -m benchmarks.robustness_matrix [--fast] [--out docs]     -> docs/robustness.md (a table) + robustness.json

A case is a small definition in CASES: a name, `setup(tmp) -> argv` (after `python -m attrclf`), the substring its
message must contain, and optionally a signal sent inside the second epoch and a `kept(tmp)` that says what stayed.
tests/test_robustness_matrix.py runs the fast cases and asserts their messages and zero tracebacks. Add a case by
appending a `Case` (or with the `case` decorator).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--no-pretrained", "--cpu-threads",
        "1", "--num-workers", "0", "--val-fraction", "0.25"]


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], list[str]]
    expect: str  # a substring of the message (stderr's last line)
    exit_code: int = 2
    fast: bool = True  # no training step: seconds
    signal: int | None = None  # sent to the process group once the first epoch's checkpoint exists
    kept: Callable[[Path], str] | None = None


@dataclass
class Outcome:
    case: str
    message: str
    exit_code: int
    traceback: bool
    kept: str
    expected: str
    passed: bool


CASES: list[Case] = []


def case(name: str, expect: str, **options):
    """Register `setup` as a case."""
    def register(setup):
        CASES.append(Case(name, setup, expect, **options))
        return setup
    return register


# ---------------------------------------------------------------- data


def labels_folder(root: Path, rows: int = 48, lines: list[str] | None = None) -> Path:
    """root/labels.txt + root/images/: `rows` images with attributes a, b, c (c has NA), or the given lines."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if lines is None:
        lines = ["img a b c"] + [f"i{n:03d}.png {n % 2} {(n // 2) % 2} {'NA' if n % 5 == 0 else int(n % 3 == 0)}"
                                 for n in range(rows)]
    for line in lines[1:]:
        name = line.split()[0]
        Image.new("RGB", (24, 24), tuple(int(v) for v in rng.integers(0, 255, 3))).save(root / "images" / name)
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def train(tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    data = data or labels_folder(tmp / "data")
    return ["train", "--data", str(data), *TINY, "--output-dir", str(tmp / "out"), *extra]


def folder_listing(path: Path) -> str:
    if not path.exists():
        return "nothing written"
    return ", ".join(sorted(p.name for p in path.iterdir())) or "an empty folder"


def outputs_kept(tmp: Path) -> str:
    return f"out/: {folder_listing(tmp / 'out')}"


# ---------------------------------------------------------------- the cases (the README's bad-input list, issue 14)


@case("--data folder missing", "no such file or folder (and not a Hub dataset id like 'user/name')")
def missing_data(tmp):
    return ["train", "--data", str(tmp / "nope"), *TINY, "--output-dir", str(tmp / "out")]


@case("labels.txt row with too few values", "labels.txt line 3: 2 values, expected 3")
def short_row(tmp):
    lines = ["img a b c", "i000.png 1 0 1", "i001.png 1 0", "i002.png 0 1 1"]
    return train(tmp, data=labels_folder(tmp / "data", lines=lines))


@case("labels.txt value not 0, 1 or NA", "labels.txt line 3: value 'x' for attribute 'b' is not 0, 1 or NA")
def bad_value(tmp):
    lines = ["img a b c", "i000.png 1 0 1", "i001.png 1 x 0", "i002.png 0 1 1"]
    return train(tmp, data=labels_folder(tmp / "data", lines=lines))


@case("images listed but missing", "1 of 48 images listed in labels.txt are not in")
def missing_image(tmp):
    data = labels_folder(tmp / "data")
    (data / "images" / "i007.png").unlink()
    return train(tmp, data=data)


@case("unknown backbone", "unknown backbone 'resnet_nope': it is not a timm model name")
def unknown_backbone(tmp):
    return [*train(tmp), "--backbone", "resnet_nope"]


@case("--image-size 0", "--image-size must be at least 8 pixels (got 0)")
def zero_image_size(tmp):
    return [*train(tmp), "--image-size", "0"]


@case("--image-size -5", "--image-size must be at least 8 pixels (got -5)")
def negative_image_size(tmp):
    return [*train(tmp), "--image-size=-5"]


@case("--image-size abc", "argument --image-size: invalid int value: 'abc'")
def text_image_size(tmp):
    return [*train(tmp), "--image-size", "abc"]


@case("--resume without a checkpoint", "--resume: no checkpoint in")
def resume_nothing(tmp):
    return train(tmp, "--resume")


@case("--output-dir is a file", "is a file, not a folder", kept=lambda tmp: f"the file: {(tmp / 'out').read_text()!r}")
def output_is_file(tmp):
    argv = train(tmp)
    (tmp / "out").write_text("keep me")
    return argv


@case("--output-dir under /proc", "is under /proc, a kernel filesystem, not storage")
def output_in_proc(tmp):
    return [*train(tmp), "--output-dir", "/proc/attrclf-out"]


@case("unreadable image (corrupt file)", "saved to", exit_code=0, fast=False, kept=outputs_kept)
def corrupt_image(tmp):
    data = labels_folder(tmp / "data")
    (data / "images" / "i003.png").write_bytes(b"not a png")
    return train(tmp, "--epochs", "1", data=data)


@case("SIGTERM inside an epoch (a scheduler's preemption)", "stopped by SIGTERM at epoch 2 step", exit_code=143,
      fast=False, signal=signal.SIGTERM, kept=outputs_kept)
def preempted(tmp):
    return train(tmp, "--epochs", "3", "--batch-size", "2", "--image-size", "48", data=labels_folder(tmp / "data", 160))


@case("Ctrl-C inside an epoch (SIGINT to the process group)", "stopped by SIGINT at epoch 2 step", exit_code=130,
      fast=False, signal=signal.SIGINT, kept=outputs_kept)
def ctrl_c(tmp):
    return train(tmp, "--epochs", "3", "--batch-size", "2", "--image-size", "48", data=labels_folder(tmp / "data", 160))


# ---------------------------------------------------------------- the labels file (header, quoting, encodings)


def raw_folder(root: Path, content: bytes, images=("a.png", "b.png", "c.png"), folders=()) -> Path:
    """root/labels.txt holding exactly `content`, and an 8x8 image per name in root/images/ (folders: directories)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(images):
        Image.new("RGB", (8, 8), (40 * n, 200, 90)).save(root / "images" / name, format="PNG")
    for name in folders:
        (root / "images" / name).mkdir()
    (root / "labels.txt").write_bytes(content)
    return root


def labels_case(name: str, expect: str, content: bytes, *extra: str, images=("a.png", "b.png", "c.png"), folders=(),
                **options) -> None:
    """Register a case that trains on a labels.txt of `content` (with `extra` flags)."""
    def setup(tmp):
        return train(tmp, *extra, data=raw_folder(tmp / "data", content, images, folders))
    CASES.append(Case(name, setup, expect, **options))


labels_case("headerless first row with a typo (`a.png 1 O NA`)",
            "labels.txt line 1: value 'O' for attribute 'Attr2' is not 0, 1 or NA",
            b"a.png 1 O NA\nb.png 0 1 1\nc.png 1 1 0\n")
labels_case("headerless first row with an invalid value (`?`)",
            "labels.txt line 1: value '?' for attribute 'Attr2' is not 0, 1 or NA", b"a.png 1 ? NA\nb.png 0 1 1\n")
labels_case("headerless first row with an invalid value (`yes`)",
            "labels.txt line 1: value 'yes' for attribute 'Attr1' is not 0, 1 or NA", b"a.png yes 1 1\nb.png 0 1 1\n")
labels_case("header whose names are numbers (`image 0 1`)",
            "cannot tell whether the first row 'image 0 1' is a header or an image's labels ('image' is not in",
            b"image 0 1\na.png 1 0\nb.png 0 1\nc.png 1 NA\n")
labels_case("header whose names are numbers, with --header", "saved to",
            b"image 0 1\na.png 1 0\nb.png 0 1\nc.png 1 NA\na2.png 0 0\n", "--header", "--epochs", "1",
            "--val-fraction", "0.5", images=("a.png", "b.png", "c.png", "a2.png"), exit_code=0, fast=False,
            kept=outputs_kept)
labels_case("first row mixing labels and words (`photo 1 hat`)",
            "cannot tell whether the first row 'photo 1 hat' is a header or an image's labels",
            b"photo 1 hat\na.png 1 0\nb.png 0 1\n")
labels_case("image name with a space, unquoted",
            "labels.txt line 3: 'my' and 'photo.jpg' look like one image name with a space; quote it: "
            '"my photo.jpg"', b"a.png 1 0\nb.png 0 1\nmy photo.jpg 1 0\n", images=("a.png", "b.png", "my photo.jpg"))
labels_case("a quote that is not closed", 'labels.txt line 2: a " opens a quoted name that is not closed on this line',
            b'a.png 1 0\n"b.png 0 1\n')
labels_case("labels.txt in Latin-1",
            "labels.txt is not UTF-8 (byte 0xe9 at offset 23, line 3); if it is Latin-1, pass --labels-encoding",
            "a.png 1 0\nb.png 0 1\ncaf\xe9.png 1 1\n".encode("latin-1"), images=("a.png", "b.png", "caf\xe9.png"))
labels_case("--labels-encoding that Python does not know", "--labels-encoding 'klingon': not an encoding Python knows",
            b"a.png 1 0\nb.png 0 1\n", "--labels-encoding", "klingon")
labels_case("labels.txt in UTF-16", "labels.txt is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8",
            "image x y\na.png 1 0\nb.png 0 1\n".encode("utf-16"))
labels_case("labels.txt that is binary (a PNG)", "labels.txt looks binary (a NUL byte at offset",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
labels_case("an image path that is a directory", "labels.txt line 2: 'd.png' is a directory in",
            b"a.png 1 0\nd.png 0 1\nb.png 1 1\n", folders=("d.png",))


@case("--labels pointing at a folder", "is a directory; pass the labels file itself with --labels FILE")
def labels_is_folder(tmp):
    data = raw_folder(tmp / "data", b"a.png 1 0\nb.png 0 1\n")
    (data / "sub").mkdir()
    return train(tmp, "--labels", str(data / "sub"), data=data)


# ---------------------------------------------------------------- running


def environment(tmp: Path) -> dict:
    return {**os.environ, "ATTRCLF_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}


def last_line(stderr: str, stdout: str) -> str:
    """The message: stderr's last line, or the whole of a message that spans lines (from its `error:` on)."""
    lines = [line for line in stderr.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    if not lines:  # a run that succeeded says so on stdout
        lines = [line for line in stdout.splitlines() if line.strip()]
    starts = [n for n, line in enumerate(lines) if line.startswith(("error:", "stopped", "interrupted"))
              or ": error:" in line]
    return " ".join(line.strip() for line in lines[starts[-1]:]) if starts else (lines[-1].strip() if lines else "")


def run_case(item: Case, tmp: Path) -> Outcome:
    tmp.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "attrclf", *item.setup(tmp)]
    process = subprocess.Popen(command, cwd=tmp, env=environment(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    if item.signal is not None:
        first = tmp / "out" / "checkpoints" / "epoch_0001" / "training_state.json"
        deadline = time.time() + 300
        while not first.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(process.pid, item.signal)
    stdout, stderr = process.communicate(timeout=600)
    message = last_line(stderr, stdout)
    kept = item.kept(tmp) if item.kept else ""
    traceback = "Traceback" in stderr
    passed = item.expect in message and process.returncode == item.exit_code and not traceback
    return Outcome(item.name, message, process.returncode, traceback, kept, item.expect, passed)


def run_all(root: Path, fast_only: bool = False) -> list[Outcome]:
    selected = [c for c in CASES if c.fast or not fast_only]
    return [run_case(item, root / f"case_{n:02d}") for n, item in enumerate(selected)]


def markdown(results: list[Outcome]) -> str:
    rows = ["# Bad-input matrix", "",
            "Generated by `python -m benchmarks.robustness_matrix` (each case a fresh `python -m attrclf ...` on tiny "
            "generated data); tests/test_robustness_matrix.py asserts the fast ones. Read-only filesystems, a full "
            "disk and a disk without room are simulated in tests/test_outputs.py (no such mount here).", "",
            "| case | message (stderr's last line) | exit code | traceback | what was kept | as expected |",
            "|---|---|---|---|---|---|"]
    for r in results:
        message = r.message.replace("|", "\\|")
        rows.append(f"| {r.case} | `{message}` | {r.exit_code} | {'yes' if r.traceback else 'no'} | {r.kept} | "
                    f"{'yes' if r.passed else 'NO'} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the cases that train no step")
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder for robustness.md and robustness.json")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        results = run_all(Path(scratch), fast_only=args.fast)
    for r in results:  # the scratch folder's name changes from run to run
        r.message, r.kept = r.message.replace(scratch, "TMP"), r.kept.replace(scratch, "TMP")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.md").write_text(markdown(results))
    (out / "robustness.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(markdown(results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
