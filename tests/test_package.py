"""attrclf as a wheel: built from this checkout, installed into a fresh venv outside it, used only from there.

To stay fast the venv borrows the test venv's dependencies (a .pth file naming its site-packages) and installs the
wheel with --no-deps; attrclf itself must come from the wheel, which the first check asserts.
"""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import attrclf

from .conftest import REPO

pytestmark = pytest.mark.slow

TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "16", "--num-workers", "0"]


def build_wheel(folder: Path) -> Path:
    """`pip wheel` of the checkout; without isolation when hatchling is already installed (offline), else pip fetches
    the build backend from PyPI."""
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(folder), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = folder.glob("attrclf-*.whl")
    return wheel


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A venv at `folder` with the wheel installed and the test venv's packages visible; returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "borrowed_test_deps.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    return folder / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    bin_dir = fresh_venv(root / "venv", build_wheel(root / "dist"))
    work = root / "work"  # outside the checkout: nothing there can be imported by accident
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(ATTRCLF_CACHE=str(root / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               GRADIO_ANALYTICS_ENABLED="False", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return bin_dir, work, env


def run(installed, *args: str) -> subprocess.CompletedProcess:
    bin_dir, work, env = installed
    result = subprocess.run([*args], capture_output=True, text=True, cwd=work, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_attrclf_comes_from_the_wheel(installed):
    bin_dir, _, _ = installed
    code = ("import json, attrclf, attrclf.card as card; from attrclf import AttrClassifier, Predictor; "
            "print(json.dumps([attrclf.__file__, attrclf.__version__, card.card_template()]))")
    location, version, template = json.loads(run(installed, str(bin_dir / "python"), "-c", code).stdout)
    assert Path(location).is_relative_to(bin_dir.parent) and version == attrclf.__version__
    assert template == (REPO / "hub_card.md").read_text()  # the packaged copy (no checkout beside the venv's one)


def test_train_card_evaluate_predict_from_the_installed_command(installed):
    _, work, _ = installed
    run(installed, "attrclf", "train", *TINY, "--demo-size", "80", "--epochs", "1", "--output-dir", "out")
    card = (work / "out" / "README.md").read_text()
    assert "# attrclf: test_resnet" in card and f"Saved by attrclf {attrclf.__version__}." in card
    assert "## Limitations" in card and "attrclf predict --model PATH_OR_REPO_ID" in card
    assert json.loads((work / "out" / "config.json").read_text())["attrclf_version"] == attrclf.__version__

    run(installed, "attrclf", "demo", "test_set", "--num-images", "12", "--image-size", "32", "--seed", "1")
    evaluated = run(installed, "attrclf", "evaluate", "--model", "out", "--data", "test_set", "--output", "eval")
    assert "12 images scored, 0 unreadable" in evaluated.stdout and "mAP" in evaluated.stdout
    assert sorted(p.name for p in (work / "eval").iterdir()) == ["metrics.json", "pr_curves.png", "predictions.csv"]
    assert json.loads((work / "eval" / "metrics.json").read_text())["num_images"] == 12

    predicted = run(installed, "attrclf", "predict", "--model", "out", "test_set/images", "--format", "json")
    results = json.loads(predicted.stdout)
    assert len(results) == 12 and set(results[0]["probabilities"]) == set(json.loads(
        (work / "out" / "config.json").read_text())["label_names"])


def test_push_space_files_come_from_the_installed_package(installed):
    bin_dir, _, _ = installed
    code = ("import json; from attrclf.hub import SpaceSource, space_files; "
            "files = space_files(SpaceSource.installed(), 'u/space', 'u/model', 'apache-2.0'); "
            "print(json.dumps({k: v.decode() for k, v in files.items() if not k.endswith('.py') or k == 'app.py'} | "
            "{'names': sorted(files)}))")
    files = json.loads(run(installed, str(bin_dir / "python"), "-c", code).stdout)
    package = sorted(f"attrclf/{p.name}" for p in (REPO / "attrclf").glob("*.py"))
    assert files["names"] == sorted(["README.md", "app.py", "requirements.txt", *package])
    assert files["app.py"] == (REPO / "app.py").read_text()
    assert "torch==" in files["requirements.txt"] and "pytest" not in files["requirements.txt"]
