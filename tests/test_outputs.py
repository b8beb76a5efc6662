"""--output-dir checked before training, a full disk mid-run as one line with nothing lost, stale temporary folders
swept, and output files that honour the umask (attrclf.outputs, attrclf.fileio)."""

import errno
import os
import stat
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors.torch
from accelerate import Accelerator

from attrclf import outputs
from attrclf.checkpoints import list_checkpoints, read_checkpoint
from attrclf.engine import train_and_save
from attrclf.model import AttrClassifier
from attrclf.outputs import check_space, check_writable, needed_bytes, sweep
from attrclf.splits import data_fingerprint

from .conftest import error_of, tiny_config, tiny_split

Usage = namedtuple("Usage", "total used free")


def test_an_output_dir_that_cannot_hold_files_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    assert error_of(lambda: check_writable(tmp_path / "afile")) == (
        f"--output-dir '{tmp_path / 'afile'}' is a file, not a folder: choose a folder (it is created when missing) "
        f"or move the file")
    assert error_of(lambda: check_writable(tmp_path / "afile" / "out")) == (
        f"--output-dir '{tmp_path / 'afile' / 'out'}': '{tmp_path / 'afile'}' is a file, so no folder can be created "
        f"there")
    assert error_of(lambda: check_writable("/proc/attrclf-out")) == (
        "--output-dir '/proc/attrclf-out' is under /proc, a kernel filesystem, not storage: choose a folder on a disk")
    check_writable(tmp_path / "new" / "deeper")  # missing folders are fine: created at the end
    assert not (tmp_path / "new").exists() and sorted(os.listdir(tmp_path)) == ["afile"]  # the probe left nothing

    for code in (errno.EROFS, errno.EACCES):
        def refuse(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
        name = errno.errorcode[code]
        assert error_of(lambda: check_writable(tmp_path / "out")) == (
            f"--output-dir '{tmp_path / 'out'}' is not writable ({os.strerror(code).lower()} ({name}) in "
            f"'{tmp_path}'): choose a folder you can write to")


def test_a_disk_without_room_for_the_model_and_its_checkpoints_is_refused(tmp_path, monkeypatch):
    # 1M parameters = 4 MB of fp32 weights; 2 kept checkpoints = 3 on disk while the oldest is replaced, 5 copies each
    assert needed_bytes(1_000_000, 2) == 4_000_000 + 3 * 5 * 4_000_000 + 20 * 2**20
    assert needed_bytes(1_000_000, 0) == 4_000_000 + 20 * 2**20
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 50 * 2**20, 50 * 2**20))
    check_space(tmp_path / "out", 100_000, 2)  # 26.1 MB needed
    assert error_of(lambda: check_space(tmp_path / "out", 2_000_000, 2)) == (
        f"--output-dir '{tmp_path / 'out'}': 50.0 MB free on its disk, the run needs about 142.1 MB (the model, "
        f"7.6 MB, and 3 checkpoint(s) of about 38.1 MB); free some space, choose another disk, or lower "
        f"--keep-checkpoints")


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_previous_checkpoint_stays(tmp_path, tiny_data, monkeypatch):
    cfg = tiny_config(tiny_data, tmp_path / "out", epochs=2, keep_checkpoints=2)
    data = tiny_split(tiny_data)
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def fill_up(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if str(filename).endswith("best_model.safetensors") and calls["n"] > 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_up)
    message = error_of(lambda: train_and_save(cfg, data, Accelerator()))
    assert message == (f"could not write checkpoint epoch_0002 to '{tmp_path / 'out' / 'checkpoints'}': no space left "
                       f"on device (ENOSPC). The previous model and checkpoints there are unchanged; free some space "
                       f"and run again (--resume continues from the last checkpoint)")
    monkeypatch.undo()
    root = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["epoch_0001"]  # no temporary folder left
    run, best = read_checkpoint(list_checkpoints(root)[-1], data_fingerprint(data), cfg, Accelerator())
    assert run.epoch == 1 and best.epoch == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoints"]  # no outputs written


def test_a_full_disk_at_the_final_save_keeps_the_previous_model(tmp_path, tiny_data, monkeypatch, capsys):
    out = tmp_path / "out"
    cfg = tiny_config(tiny_data, out, epochs=1, keep_checkpoints=1)
    data = tiny_split(tiny_data)
    train_and_save(cfg, data, Accelerator())
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    (out / ".staging-abc123").mkdir()  # as a SIGKILL mid-write leaves them
    (out / "checkpoints" / ".tmp-epoch_0003-xyz").mkdir(parents=True)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(AttrClassifier, "save_pretrained", full)
    message = error_of(lambda: train_and_save(tiny_config(tiny_data, out, epochs=1, keep_checkpoints=1, seed=3), data,
                                              Accelerator()))
    assert message.startswith(f"could not write the model and reports to '{out}': no space left on device (ENOSPC).")
    printed = capsys.readouterr().out
    assert f"removed {out / '.staging-abc123'}: a temporary folder an interrupted write left behind" in printed
    assert f"removed {out / 'checkpoints' / '.tmp-epoch_0003-xyz'}" in printed
    after = sorted(os.listdir(out))
    assert after == sorted([*before, "checkpoints"])  # the old outputs, and this run's checkpoint for --resume
    assert all((out / name).read_bytes() == content for name, content in before.items())
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0001"]
    AttrClassifier.from_pretrained(out)  # the previous model still loads


def test_sweep_removes_only_temporary_folders(tmp_path):
    for name in (".staging-1", "model.safetensors", "checkpoints/.tmp-epoch_0001-a", "checkpoints/epoch_0001"):
        (tmp_path / name).mkdir(parents=True)
    assert sorted(p.name for p in sweep(tmp_path)) == [".staging-1", ".tmp-epoch_0001-a"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "checkpoints", "checkpoints/epoch_0001", "model.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_file_honours_the_umask(tmp_path, tiny_data, umask):
    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        train_and_save(tiny_config(tiny_data, out, epochs=1, keep_checkpoints=1), tiny_split(tiny_data),
                       Accelerator())
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes and modes == {name: 0o666 & ~umask for name in modes}  # model.safetensors too: not mkstemp's 0600
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert Path(out / "model.safetensors").exists()
