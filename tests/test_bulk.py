"""Bulk predict (attrclf.bulk): DataLoader workers, streamed CSV / JSONL / Parquet in input order, unreadable images
reported and skipped, and `accelerate launch -m attrclf predict` on two gloo processes giving one process's rows."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from attrclf import Predictor
from attrclf.bulk import PathSources, dataset_sources, write_predictions
from attrclf.predict import main

from .conftest import REPO, write_image

CORRUPT = {10, 37}


@pytest.fixture(scope="module")
def fifty(tmp_path_factory):
    """50 images (names sorted = input order), of which numbers 10 and 37 are not images."""
    folder = tmp_path_factory.mktemp("fifty") / "imgs"
    rng = np.random.default_rng(0)
    for n in range(50):
        path = folder / f"im{n:02d}.png"
        if n in CORRUPT:
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not a png")
        else:
            write_image(path, tuple(int(v) for v in rng.integers(0, 255, 3)), (int(rng.integers(20, 60)), 30))
    return folder


def good_paths(folder):
    return [p for n, p in enumerate(sorted(folder.iterdir())) if n not in CORRUPT]


@pytest.fixture(scope="module")
def expected(saved_model, fifty):
    """Predictor's own probabilities of the 48 readable images, one call."""
    predictor = Predictor.from_pretrained(str(saved_model[0]), device="cpu", backend="torch")
    return predictor, predictor.predict_probs(good_paths(fifty))


def read_rows(path):
    if path.suffix == ".csv":
        return [(r["image"], [float(r[n]) for n in ("red", "round", "big")], r["present"].split(";") if r["present"]
                 else []) for r in csv.DictReader(path.open())]
    if path.suffix == ".jsonl":
        return [(r["image"], list(r["probabilities"].values()), r["present"])
                for r in map(json.loads, path.read_text().splitlines())]
    table = pq.read_table(path).to_pylist()
    return [(r["image"], [r["red"], r["round"], r["big"]], r["present"]) for r in table]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_fifty_images_two_corrupt_give_48_rows_in_order(expected, fifty, tmp_path, suffix):
    predictor, probs = expected
    out = tmp_path / f"preds{suffix}"
    summary = write_predictions(predictor, PathSources(sorted(fifty.iterdir())), out, batch_size=8, workers=2,
                                show_progress=False)
    rows = read_rows(out)
    assert [name for name, _, _ in rows] == [str(p) for p in good_paths(fifty)]
    assert np.abs(np.array([p for _, p, _ in rows]) - probs).max() < 1e-5
    thresholds = [0.3, 0.5, 0.7]
    assert [present for _, _, present in rows] == [[n for n, p, t in zip(("red", "round", "big"), row, thresholds,
                                                                          strict=True) if p >= t] for row in probs]
    assert summary.written == 48 and [name for name, _ in summary.skipped] == [str(fifty / "im10.png"),
                                                                               str(fifty / "im37.png")]
    assert all("cannot read image" in reason for _, reason in summary.skipped)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # streamed under a temporary name, renamed


def test_cli_lists_the_skipped_images_and_exits_1(saved_model, fifty, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["--model", str(saved_model[0]), str(fifty), "--output", str(out), "--workers", "0",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "im10.png" in err and "im37.png" in err
    assert "wrote 48 predictions" in err and "2 unreadable image(s) skipped" in err
    assert len(read_rows(out)) == 48


def test_file_list_and_data_sources(saved_model, expected, fifty, tmp_path, labels_factory):
    predictor, probs = expected
    listing = fifty.parent / "list.txt"  # relative paths are relative to the list's folder; absolute ones stay
    names = [p.name for p in good_paths(fifty)][:5]
    lines = [f"{fifty.name}/{n}" for n in names[:4]] + [str(fifty / names[4])]
    listing.write_text("# five images\n" + "\n".join(lines) + "\n\n")
    out = tmp_path / "list.jsonl"
    assert main(["--model", str(saved_model[0]), "--file-list", str(listing), "--output", str(out),
                 "--no-progress"]) == 0
    rows = read_rows(out)
    assert [name.rsplit("/", 1)[1] for name, _, _ in rows] == names
    assert np.abs(np.array([p for _, p, _ in rows]) - probs[:5]).max() < 1e-5
    data = labels_factory(["img x", "a.png 1", "b.png 0", "c.png NA"])
    sources = dataset_sources(str(data))
    out = tmp_path / "data.csv"
    write_predictions(predictor, sources, out, show_progress=False)
    direct = predictor.predict_probs(sorted((data / "images").iterdir()))
    rows = read_rows(out)
    assert [name for name, _, _ in rows] == ["a.png", "b.png", "c.png"]
    assert np.abs(np.array([p for _, p, _ in rows]) - direct).max() < 1e-5


def test_bad_flags_are_one_line_errors(saved_model, fifty, tmp_path, capsys):
    model = ["--model", str(saved_model[0])]
    for argv, message in [([str(fifty), "--output", str(tmp_path / "p.xlsx")], "choose a file ending in"),
                          ([str(fifty), "--output", str(tmp_path / "no" / "p.csv")], "does not exist"),
                          ([], "nothing to predict"), (["--data", str(fifty), str(fifty)], "give it alone"),
                          (["--file-list", str(tmp_path / "missing.txt")], "no such file")]:
        assert main(model + argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow  # two gloo processes under accelerate launch: about 30 s on 2 busy cores
def test_two_processes_write_the_rows_of_one(saved_model, fifty, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert main(["--model", str(saved_model[0]), str(fifty), "--output", str(one), "--no-progress"]) == 1
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attrclf", "predict",
               "--model", str(saved_model[0]), str(fifty), "--output", str(two), "--batch-size", "4", "--workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert result.returncode == 1, result.stderr[-3000:]  # 1: the two unreadable images
    assert "2 processes" in result.stderr and "wrote 48 predictions" in result.stderr
    assert "im10.png" in result.stderr and "im37.png" in result.stderr
    rows_one, rows_two = read_rows(one), read_rows(two)
    assert [r[0] for r in rows_two] == [r[0] for r in rows_one] and len(rows_two) == 48
    assert np.abs(np.array([r[1] for r in rows_two]) - np.array([r[1] for r in rows_one])).max() < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv", "two.csv"]  # no part files left
