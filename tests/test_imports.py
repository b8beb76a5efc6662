"""The serving path stays light: importing attrclf.predict and attrclf.ui loads no training or plotting stack."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

HEAVY = ("datasets", "accelerate", "matplotlib")


def heavy_modules_after(*modules: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds in sys.modules after importing `modules`."""
    code = f"import json, sys, {', '.join(modules)}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_package_and_the_command_import_nothing_heavy():
    assert heavy_modules_after("attrclf", "attrclf.cli") == []


@pytest.mark.slow  # imports torch and gradio in a fresh interpreter: 10-30 s on 2 busy cores
def test_predict_and_ui_import_no_datasets_accelerate_or_matplotlib():
    assert heavy_modules_after("attrclf.predict", "attrclf.ui") == []
