"""The Hub package against a local Hub-compatible server (tests/hub_server.py): card, push, pull by id, Space.

The Hub client reads HF_ENDPOINT when it is imported, so everything that talks to the server runs in a subprocess
with its own environment: the server's URL, a fake token (or none), an empty cache and HF_HUB_OFFLINE unset.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard, constants

from attrclf import AttrClassifier, AttrclfError, Predictor
from attrclf.hub import check_can_push, check_repo_id, model_files, runtime_requirements

from . import hub_server
from .conftest import REPO, write_image

TOKEN = "hf_attrclfTestToken0123456789"  # the one token the server accepts; it must never show up anywhere
MODEL_ID = "user/attrclf"
TINY = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "16", "--num-workers", "0"]
SECTIONS = ["## How to use", "## Training data", "## Training procedure", "## Evaluation", "## Limitations"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server, state, endpoint = hub_server.start(tmp_path_factory.mktemp("hub"), {TOKEN})
    state.endpoint = endpoint
    yield state
    server.shutdown()
    server.server_close()


def client_env(endpoint: str, home: Path, token: str | None = TOKEN) -> dict:
    """A Hub client pointed at `endpoint`, with `token` (None: no token anywhere) and an empty cache under `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") or k == "HF_DATASETS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(home / "cache"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="30", PYTHONUNBUFFERED="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args: list[str], env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
                            check=False)
    assert TOKEN not in result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def trained(hub, tmp_path_factory):
    """`python train.py ... --push-to-hub user/attrclf`: a tiny demo run that pushes its folder at the end."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "outputs"
    env = {**client_env(hub.endpoint, tmp / "home"), "ATTRCLF_CACHE": str(tmp / "cache")}
    result = run([str(REPO / "train.py"), *TINY, "--demo-size", "80", "--epochs", "2", "--output-dir", str(out),
                  "--push-to-hub", MODEL_ID], env, cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def folder_state(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- push at the end of training


@pytest.mark.slow
def test_training_pushes_the_output_folder_in_one_commit(hub, trained):
    out, result = trained
    local = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(local) == ["README.md", "config.json", "history.json", "loss_curve.png", "metrics.json",
                             "model.safetensors", "pr_curves.png", "train_config.json"]
    assert f"pushed {out}/ to {MODEL_ID}" in result.stdout
    pushed = hub.files(MODEL_ID)
    assert set(pushed) == set(local) | {".gitattributes"}  # .gitattributes: the Hub's own, made with the repo
    for name, content in local.items():
        assert pushed[name] == content, name  # byte for byte, the card included: the run named the repo
    assert [c.message for c in hub.commits(MODEL_ID)][1:] == ["attrclf model from outputs/"]
    assert not hub.repos[("model", MODEL_ID)].private
    assert hub.unhandled == []


@pytest.mark.slow
def test_pushed_card_metadata_and_numbers_are_the_runs(hub, trained):
    out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    card = ModelCard(hub.files(MODEL_ID)["README.md"].decode())
    meta = yaml.safe_load(card.content.split("---")[1])  # the front matter, parsed on its own too
    assert meta["library_name"] == "attrclf" and meta["pipeline_tag"] == "image-classification"
    assert {"multilabel", "attribute-classification", "timm", "test_resnet"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"
    assert "base_model" not in meta and "datasets" not in meta  # from scratch, on the generated demo
    validation = metrics["validation"]
    by_name = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert by_name == {
        "mAP over known labels": round(validation["mAP"], 4),
        "macro-F1 at threshold 0.5": round(validation["f1_macro_at_0.5"], 4),
        "macro-F1 at thresholds tuned on this split (optimistic)": round(validation["f1_macro_tuned"], 4),
        "macro-F1, thresholds tuned and scored on different halves": round(validation["f1_macro_tuned_crossfit"], 4),
    }
    assert {r.dataset_split for r in card.data.eval_results} == {"validation"}

    text = card.text
    assert [s for s in SECTIONS if s not in text] == []
    assert f'Predictor.from_pretrained("{MODEL_ID}")' in text and f"--model {MODEL_ID}" in text
    assert "NA entries never entered the loss" in text
    for name, row in validation["per_attribute"].items():
        counts = metrics["data"]["train_counts"][name]
        assert f"| {name} | {counts['positive']} | {counts['negative']} | {counts['na']} |" in text
        scores = f"| {row['ap']:.3f} | {row['f1']:.3f} | {row['f1_at_0.5']:.3f} | {row['precision']:.3f} |"
        assert f"| {name} {scores}" in text
    assert f"mAP **{validation['mAP']:.3f}**" in text and f"**{validation['f1_macro_tuned_crossfit']:.3f}**" in text
    assert f"ran {metrics['epochs_run']} of at most 2" in text and "Stages: one stage training every layer" in text
    for image in ("loss_curve.png", "pr_curves.png"):
        assert f"]({image})" in text and hub.files(MODEL_ID)[image][:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- pull by id


@pytest.fixture(scope="module")
def more_pushes(hub, trained, saved_model, tmp_path_factory):
    """`python -m attrclf.hub push`: another model (saved outside training) to branch v2, and to a private repo."""
    env = client_env(hub.endpoint, tmp_path_factory.mktemp("pushes"))
    to_branch = run(["-m", "attrclf.hub", "push", str(saved_model[0]), MODEL_ID, "--revision", "v2"], env)
    private = run(["-m", "attrclf.hub", "push", str(saved_model[0]), "user/secret", "--private"], env)
    assert to_branch.returncode == 0 and private.returncode == 0, to_branch.stderr + private.stderr
    return saved_model[0]


PULL = """
import json, os, sys
import numpy as np, torch
from dataclasses import asdict
from huggingface_hub import snapshot_download
from attrclf import AttrClassifier, AttrclfError, Predictor
local_dir, image, out = sys.argv[1:]
hub_model = AttrClassifier.from_pretrained("user/attrclf")  # a fresh process, an empty cache
local_model = AttrClassifier.from_pretrained(local_dir)
x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    np.save(out + "/hub_logits.npy", hub_model(x).numpy())
    np.save(out + "/local_logits.npy", local_model(x).numpy())

def labels(model_id, **kwargs):
    try:
        return Predictor.from_pretrained(model_id, device="cpu", **kwargs).label_names
    except AttrclfError as e:
        return str(e)

json.dump({"config": asdict(hub_model.config),
           "predicted": Predictor.from_pretrained("user/attrclf", device="cpu").predict(image),
           "expected": Predictor(local_model).predict(image),
           "v2": labels("user/attrclf", revision="v2"),
           "no_such_revision": labels("user/attrclf", revision="nope"),
           "private_without_token": labels("user/secret", token=False),
           "private_with_token": labels("user/secret"),
           "snapshot": sorted(os.listdir(snapshot_download("user/attrclf")))}, open(out + "/pulled.json", "w"))
"""


@pytest.fixture(scope="module")
def pulled(hub, trained, more_pushes, tmp_path_factory):
    """One fresh process (empty cache) that loads the pushed models by id; its findings as JSON."""
    tmp = tmp_path_factory.mktemp("pull")
    image = write_image(tmp / "red.png", (220, 20, 20), (40, 40))
    result = run(["-c", PULL, str(trained[0]), str(image), str(tmp)], client_env(hub.endpoint, tmp / "home"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, json.loads((tmp / "pulled.json").read_text())


@pytest.mark.slow
def test_fresh_process_loads_the_pushed_model_by_id(hub, trained, pulled):
    tmp, found = pulled
    assert np.array_equal(np.load(tmp / "hub_logits.npy"), np.load(tmp / "local_logits.npy"))
    assert found["config"] == json.loads((trained[0] / "config.json").read_text())
    assert found["predicted"] == found["expected"]
    assert found["snapshot"] == sorted(hub.files(MODEL_ID))  # snapshot_download gets the whole repo
    assert (tmp / "home" / "cache" / "models--user--attrclf" / "snapshots").is_dir()  # the standard cache
    assert hub.unhandled == []


@pytest.mark.slow
def test_revisions_and_private_repos(hub, pulled):
    found = pulled[1]
    assert found["v2"] == ["red", "round", "big"]
    assert "cannot load the model 'user/attrclf' at revision 'nope'" in found["no_such_revision"]
    assert "has no such revision" in found["no_such_revision"]
    assert hub.repos[("model", "user/secret")].private
    assert "did not accept the token for 'user/secret'" in found["private_without_token"]
    assert "hf auth login" in found["private_without_token"]
    assert found["private_with_token"] == ["red", "round", "big"]


@pytest.mark.slow
def test_push_to_a_branch_replaces_the_package_and_keeps_main(hub, more_pushes):
    v2 = hub.files(MODEL_ID, "v2")
    # branched from main, then the package replaced: main's reports and plots are gone, not left beside new weights
    assert sorted(v2) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert v2["model.safetensors"] == (more_pushes / "model.safetensors").read_bytes()
    assert len(hub.files(MODEL_ID, "main")) == 9
    card = v2["README.md"].decode()
    assert "# attrclf: test_resnet" in card and "Not recorded" in card  # our card, not the mixin's default


@pytest.mark.slow
def test_predict_cli_by_id_and_revision(hub, more_pushes, tmp_path):
    image = write_image(tmp_path / "img" / "red.png", (220, 20, 20), (40, 40))
    predicted = run(["-m", "attrclf.predict", "--model", MODEL_ID, "--revision", "v2", str(image), "--format", "json"],
                    client_env(hub.endpoint, tmp_path / "home", token=None))
    assert predicted.returncode == 0, predicted.stderr
    [result] = json.loads(predicted.stdout)
    assert result["thresholds"] == {"red": 0.3, "round": 0.5, "big": 0.7}
    local = Predictor(AttrClassifier.from_pretrained(more_pushes)).predict(image)
    assert result["probabilities"] == pytest.approx(local["probabilities"], abs=1e-6)
    assert hub.unhandled == []


# ---------------------------------------------------------------- errors


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: connection refused


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("server down", "is unreachable"),
    ("no token", "no Hugging Face token"),
    ("wrong token", "did not accept the token for 'user/other'"),
])
def test_push_failures_are_clear_and_leave_the_folder_alone(hub, trained, tmp_path, case, message):
    folder = tmp_path / "outputs"
    shutil.copytree(trained[0], folder)
    before = folder_state(folder)
    endpoint = closed_port_endpoint() if case == "server down" else hub.endpoint
    token = {"no token": None, "wrong token": "hf_wrong"}.get(case, TOKEN)
    result = run(["-m", "attrclf.hub", "push", str(folder), "user/other"], client_env(endpoint, tmp_path / "h", token))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert f"Nothing in '{folder}' was changed" in result.stderr
    assert f"python -m attrclf.hub push {folder} user/other" in result.stderr
    assert folder_state(folder) == before
    assert ("model", "user/other") not in hub.repos


def test_push_to_hub_without_a_token_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(AttrclfError, match="cannot push to 'user/attrclf': no Hugging Face token"):
        check_can_push(MODEL_ID)
    with pytest.raises(AttrclfError, match="--push-to-hub 'attrclf' needs a namespace"):
        check_can_push("attrclf")
    # the check is training's first step, before any data or model
    train = (REPO / "attrclf" / "training.py").read_text()
    assert train.index("check_can_push(cfg.push_to_hub)") < train.index("load_training_data(cfg")


def test_bad_ids_and_folders_are_clear_errors(tmp_path):
    with pytest.raises(AttrclfError, match="needs a namespace: write it as your-username/attrclf"):
        check_repo_id("attrclf")
    with pytest.raises(AttrclfError, match="not a valid Hub id"):
        check_repo_id("a/b/c")
    with pytest.raises(AttrclfError, match="has no model.safetensors or config.json"):
        model_files(tmp_path)


def test_only_the_model_package_is_pushed(saved_model, tmp_path):
    folder = tmp_path / "outputs"
    shutil.copytree(saved_model[0], folder)
    (folder / "loss_curve.png").write_bytes(b"png")
    (folder / "metrics.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / ".staging-x").mkdir()
    (folder / "checkpoints").mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "model.int8.onnx").write_bytes(b"onnx")
    assert [p.name for p in model_files(folder)] == ["README.md", "config.json", "loss_curve.png", "metrics.json",
                                                     "model.int8.onnx", "model.onnx", "model.safetensors"]


@pytest.mark.slow
def test_no_token_in_any_pushed_or_written_file(hub, trained):
    stored = [p.read_bytes() for p in hub.blobs.iterdir()]
    written = [p.read_bytes() for p in trained[0].rglob("*") if p.is_file()]
    assert stored and written and not any(TOKEN.encode() in content for content in stored + written)


# ---------------------------------------------------------------- the Space


@pytest.fixture
def source_root(tmp_path):
    """An attrclf checkout with a stand-in app.py (the app is another issue's)."""
    root = tmp_path / "source"
    shutil.copytree(REPO / "attrclf", root / "attrclf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "requirements.txt", root / "requirements.txt")
    (root / "app.py").write_text('import os\nMODEL = os.environ.get("ATTRCLF_MODEL", "outputs")\n')
    return root


@pytest.mark.slow
def test_push_space_uploads_exactly_the_space(hub, trained, source_root, tmp_path):
    env = client_env(hub.endpoint, tmp_path / "home")
    result = run(["-m", "attrclf.hub", "push-space", "user/attrclf-demo", "--model", MODEL_ID,
                  "--source", str(source_root)], env)
    assert result.returncode == 0, result.stderr
    files = hub.files("user/attrclf-demo", repo_type="space")
    package = {p.relative_to(source_root).as_posix() for p in (source_root / "attrclf").rglob("*.py")}
    assert set(files) == {".gitattributes", "README.md", "app.py", "requirements.txt"} | package
    assert files["app.py"] == (source_root / "app.py").read_bytes()
    assert files["attrclf/hub.py"] == (REPO / "attrclf" / "hub.py").read_bytes()

    requirements = files["requirements.txt"].decode()
    assert "torch==" in requirements and "timm==" in requirements and "gradio==" in requirements
    assert "pytest" not in requirements and "scikit-learn" not in requirements

    meta = yaml.safe_load(files["README.md"].decode().split("---")[1])
    pinned = next(line.split("==")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.startswith("gradio=="))
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == pinned and meta["app_file"] == "app.py"
    assert meta["models"] == [MODEL_ID] and meta["license"] == "apache-2.0" and meta["title"] == "attrclf-demo"
    assert 0 < len(meta["short_description"]) <= 60
    space = hub.repos[("space", "user/attrclf-demo")]
    assert space.sdk == "gradio" and space.variables["ATTRCLF_MODEL"]["value"] == MODEL_ID
    assert hub.unhandled == []


@pytest.mark.slow
def test_the_pushed_space_serves_the_model_by_id(hub, trained, tmp_path):
    """The real app.py and package, pushed as a Space, then run from the Space's files with ATTRCLF_MODEL=user/attrclf
    (the model pulled from the Hub by id, as on huggingface.co): its /predict equals the local Predictor's."""
    from gradio_client import Client, handle_file

    env = client_env(hub.endpoint, tmp_path / "home")
    pushed = run(["-m", "attrclf.hub", "push-space", "user/attrclf-space", "--model", MODEL_ID], env)
    assert pushed.returncode == 0, pushed.stderr
    files = hub.files("user/attrclf-space", repo_type="space")
    assert files["app.py"] == (REPO / "app.py").read_bytes() and "attrclf/ui.py" in files
    space = tmp_path / "space"
    for name, content in files.items():
        (space / name).parent.mkdir(parents=True, exist_ok=True)
        (space / name).write_bytes(content)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_env = {**env, "ATTRCLF_MODEL": hub.repos[("space", "user/attrclf-space")].variables["ATTRCLF_MODEL"]["value"],
               "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=space, env=app_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = None
        for _ in range(240):  # the first start imports torch and gradio: allow two minutes on a busy machine
            assert server.poll() is None, server.stdout.read()
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not listening yet
                time.sleep(0.5)
        assert client is not None, "the Space's app.py never answered"
        image = write_image(tmp_path / "probe.png", (40, 200, 90), (40, 40))
        served = client.predict(handle_file(str(image)), api_name="/predict")
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    assert TOKEN not in output
    expected = Predictor.from_pretrained(str(trained[0])).predict(image)
    assert list(served["probabilities"]) == list(expected["probabilities"])
    assert list(served["probabilities"].values()) == pytest.approx(list(expected["probabilities"].values()), abs=1e-6)
    assert served["present"] == expected["present"]


@pytest.mark.slow
def test_push_space_refuses_without_app_or_model(hub, source_root, tmp_path):
    env = client_env(hub.endpoint, tmp_path / "home")
    missing_model = run(["-m", "attrclf.hub", "push-space", "user/demo2", "--model", "user/never-pushed",
                         "--source", str(source_root)], env)
    assert missing_model.returncode == 2
    assert "'user/never-pushed' does not exist" in missing_model.stderr and "Push it first" in missing_model.stderr
    (source_root / "app.py").unlink()
    no_app = run(["-m", "attrclf.hub", "push-space", "user/demo2", "--model", MODEL_ID, "--source", str(source_root)],
                 env)
    assert no_app.returncode == 2 and "has no app.py" in no_app.stderr
    assert ("space", "user/demo2") not in hub.repos


def test_runtime_requirements_drop_the_test_tools():
    text = ("# a comment\ntorch==2.14.1\ngradio==6.31.0\nruff==0.1\npytest-timeout==2\n\n# tests (below: test-only)\n"
            "pytest==9.2.0\nscikit-learn==1.9.1\n")
    assert runtime_requirements(text) == "# a comment\ntorch==2.14.1\ngradio==6.31.0\n"


# ---------------------------------------------------------------- the ONNX exports travel with the model


@pytest.mark.slow  # export, push and load by id in subprocesses
def test_onnx_exports_are_pushed_and_found_by_id(hub, saved_model, tmp_path):
    folder = tmp_path / "outputs"
    shutil.copytree(saved_model[0], folder)
    env = client_env(hub.endpoint, tmp_path / "home")
    exported = run(["-m", "attrclf", "export", str(folder), "--no-int8"], env)
    assert exported.returncode == 0, exported.stderr
    (folder / "model.int8.onnx").write_bytes(b"stand-in: pushed like any package file")
    pushed = run(["-m", "attrclf.hub", "push", str(folder), "user/onnx-model"], env)
    assert pushed.returncode == 0, pushed.stderr
    files = hub.files("user/onnx-model")
    assert files["model.onnx"] == (folder / "model.onnx").read_bytes() and "model.int8.onnx" in files
    image = write_image(tmp_path / "img" / "red.png", (220, 20, 20), (40, 40))
    code = ("import json, sys; from attrclf import Predictor; "
            "p = Predictor.from_pretrained('user/onnx-model', backend='onnx'); "
            f"print(json.dumps([p.backend_name, p.predict_probs([{str(image)!r}]).tolist()]))")
    loaded = run(["-c", code], client_env(hub.endpoint, tmp_path / "home2", token=None))
    assert loaded.returncode == 0, loaded.stderr
    name, probs = json.loads(loaded.stdout.strip().splitlines()[-1])
    local = Predictor.from_pretrained(str(folder), backend="torch").predict_probs([image])
    assert name == "onnx" and np.abs(np.array(probs) - local).max() < 1e-4
    assert hub.unhandled == []
