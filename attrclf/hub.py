"""The Hub package: the model card (hub_card.md), and pushing a trained model folder or the Gradio Space.

    python -m attrclf.hub push OUTPUT_DIR user/attrclf [--private] [--revision BRANCH]
    python -m attrclf.hub push-space user/attrclf-demo --model user/attrclf [--source ROOT] [--private]

The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); attrclf never prints or writes it.
Pushing only reads the local folder: whatever fails, the files there stay as they were.
"""

import argparse
import json
import re
import sys
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import httpx2  # huggingface_hub 2.4's HTTP client: its transport errors mean "the Hub is unreachable"
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    SpaceCardData,
    constants,
    get_token,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .errors import AttrclfError

ROOT = Path(__file__).resolve().parent.parent
CARD_TEMPLATE = ROOT / "hub_card.md"
CARD_IMAGES = ("loss_curve.png", "pr_curves.png")
# What a model repo holds: the package, the reports and the plots; never checkpoints or staging folders.
MODEL_FILES = ("model.safetensors", "config.json", "README.md", "metrics.json", "train_config.json", "history.json")
REQUIRED_MODEL_FILES = ("model.safetensors", "config.json")
SPACE_VARIABLE = "ATTRCLF_MODEL"  # app.py serves the model this names (a Hub id or a folder)
SPACE_SHORT_DESCRIPTION = "Multilabel image attributes (1/0/NA) with attrclf"  # the Hub allows 60 characters
TEST_TOOLS = {"pytest", "playwright", "ruff", "scikit-learn", "onnx", "onnxruntime", "onnxscript", "coverage"}
LOSS_NAMES = {"bce": "binary cross-entropy with logits", "asl": "asymmetric loss (ASL)"}
RARE = 0.10  # an attribute with fewer known training positives than this is called rare in the card
FEW_VALIDATION_POSITIVES = 30
MANY_NA = 0.20


# ---------------------------------------------------------------- the model card


def render_card(config: dict, metrics: dict | None = None, train_config: dict | None = None,
                repo_id: str | None = None, images: tuple[str, ...] = CARD_IMAGES) -> ModelCard:
    """The model card from hub_card.md.

    Args:
        config: The model's config.json content.
        metrics: metrics.json content; None for a model saved outside training (the card then says so).
        train_config: train_config.json content.
        repo_id: Hub id the usage lines name (default: the run's --push-to-hub).
        images: PNGs beside the card that it shows.
    """
    train_config = train_config or {}
    repo_id = repo_id or train_config.get("push_to_hub")
    return ModelCard.from_template(
        card_data(config, metrics, train_config, repo_id),
        template_path=str(CARD_TEMPLATE),
        config=config,
        metrics=metrics,
        train=train_config,
        model_ref=repo_id or "PATH_OR_REPO_ID",
        rows=attribute_rows(config, metrics),
        backbone_origin=backbone_origin(train_config),
        loss_name=LOSS_NAMES.get(train_config.get("loss"), train_config.get("loss")),
        limitations=limitations(metrics, train_config) if metrics else [],
        images=images,
        fmt=lambda v: "n/a" if v is None else f"{v:.3f}",
    )


def card_data(config: dict, metrics: dict | None, train_config: dict, repo_id: str | None) -> ModelCardData:
    """The card's YAML metadata: library, task, tags, license, base model, datasets and the model-index."""
    dataset_id = train_config.get("dataset_id")
    results = eval_results(metrics, train_config)
    return ModelCardData(
        library_name="attrclf",
        pipeline_tag="image-classification",
        license=train_config.get("license"),
        tags=["attrclf", "image-classification", "multilabel", "attribute-classification", "timm",
              config["backbone"], "model_hub_mixin", "pytorch_model_hub_mixin"],
        base_model=base_model_id(train_config),
        datasets=[dataset_id] if dataset_id else None,
        model_name=(repo_id or f"attrclf-{config['backbone']}").split("/")[-1] if results else None,
        eval_results=results or None,
    )


def eval_results(metrics: dict | None, train_config: dict) -> list[EvalResult]:
    """The model-index entries: validation mAP and macro-F1 (at 0.5, tuned, tuned on held-out halves)."""
    validation = (metrics or {}).get("validation", {})
    if validation.get("mAP") is None:
        return []
    if train_config.get("dataset_id"):
        dataset_type = dataset_name = train_config["dataset_id"]
    elif train_config.get("data"):
        dataset_type, dataset_name = "custom", Path(train_config["data"]).name
    else:
        dataset_type, dataset_name = "attrclf-demo", "attrclf demo (generated shapes)"
    figures = [
        ("mAP", "mAP over known labels", validation["mAP"]),
        ("f1", "macro-F1 at threshold 0.5", validation["f1_macro_at_0.5"]),
        ("f1", "macro-F1 at thresholds tuned on this split (optimistic)", validation["f1_macro_tuned"]),
        ("f1", "macro-F1, thresholds tuned and scored on different halves", validation["f1_macro_tuned_crossfit"]),
    ]
    return [
        EvalResult(task_type="image-classification", task_name="Multilabel attribute classification",
                   dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="validation",
                   metric_type=kind, metric_name=name, metric_value=round(value, 4))
        for kind, name, value in figures if value is not None
    ]


def base_model_id(train_config: dict) -> str | None:
    """The Hub id of the backbone weights training started from: only timm's own download can be named."""
    if not train_config.get("pretrained") or train_config.get("backbone_weights"):
        return None
    import timm  # only here: naming the weights needs timm's registry, which imports torch

    pretrained_cfg = timm.models.get_pretrained_cfg(train_config["backbone"])
    return pretrained_cfg.hf_hub_id if pretrained_cfg and pretrained_cfg.hf_hub_id else None


def backbone_origin(train_config: dict) -> str:
    if not train_config:
        return "unknown (the model was saved outside an attrclf training run)"
    if train_config.get("backbone_weights"):
        return f"pretrained weights from the local file `{Path(train_config['backbone_weights']).name}`"
    if train_config.get("pretrained"):
        hub_id = base_model_id(train_config)
        return f"pretrained weights [`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id else "timm's pretrained weights"
    return "random initial weights (trained from scratch)"


def attribute_rows(config: dict, metrics: dict | None) -> list[dict]:
    """One dict per attribute: name and threshold, and with metrics its counts, pos_weight and validation scores."""
    rows = []
    for name, threshold in zip(config["label_names"], config["thresholds"]):
        row = {"name": name, "threshold": threshold}
        if metrics:
            row.update(train=metrics["data"]["train_counts"][name],
                       validation=metrics["data"]["validation_counts"][name],
                       pos_weight=metrics["pos_weight"][name], **metrics["validation"]["per_attribute"][name])
        rows.append(row)
    return rows


def limitations(metrics: dict, train_config: dict) -> list[str]:
    """The limitations section, from the run's own numbers."""
    validation, data = metrics["validation"], metrics["data"]
    notes = []
    if not train_config.get("data"):
        notes.append("Trained on attrclf's generated demo shapes: it shows the pipeline works and says nothing about "
                     "real photographs.")
    notes.append(f"Every score here comes from {validation['num_images']} validation images drawn from the same source "
                 f"as the training images; expect lower scores on images unlike them.")
    rare, few, many_na, single = [], [], [], []
    for name, row in validation["per_attribute"].items():
        counts = data["train_counts"][name]
        known = counts["positive"] + counts["negative"]
        if known + counts["na"] and counts["na"] / (known + counts["na"]) > MANY_NA:
            many_na.append(f"`{name}` ({counts['na'] / (known + counts['na']):.0%})")
        if not row["evaluated"]:
            single.append(f"`{name}`")
        elif known and counts["positive"] / known < RARE:
            rare.append(f"`{name}`: {counts['positive']} positives among {known} known training labels "
                        f"({counts['positive'] / known:.0%}); AP {row['ap']:.3f} against the mAP of "
                        f"{validation['mAP']:.3f}, measured on only {row['positives']} validation positives")
        elif row["positives"] < FEW_VALIDATION_POSITIVES:
            few.append(f"`{name}` ({row['positives']})")
    if rare:
        notes.append("Rare in training: " + "; ".join(rare) + ".")
    if few:
        notes.append(f"Few validation positives for {', '.join(few)}: their scores would move noticeably with a few "
                     f"images more or less.")
    if many_na:
        notes.append(f"Often unknown (NA) among the training labels, so learnt from fewer examples: "
                     f"{', '.join(many_na)}.")
    if single:
        notes.append(f"{', '.join(single)}: a single class among the known validation labels, so no AP or F1 could "
                     f"be measured.")
    return notes + run_notes(metrics, train_config) + [
        "Attributes are predicted independently: nothing checks that the predicted set is consistent."]


def run_notes(metrics: dict, train_config: dict) -> list[str]:
    """Limitations that come from how the run went: thresholds, pos_weight caps, skipped images, its length."""
    validation, notes = metrics["validation"], []
    if validation["f1_macro_tuned"] is not None and validation["f1_macro_tuned_crossfit"] is not None:
        notes.append(f"Thresholds were tuned to maximise F1 on the validation images the table reports (macro-F1 "
                     f"{validation['f1_macro_tuned']:.3f} there); tuned on one half and scored on the other they give "
                     f"{validation['f1_macro_tuned_crossfit']:.3f}, the better guess for new images.")
    capped = [name for name, w in metrics["pos_weight"].items() if w >= train_config.get("pos_weight_cap", float("inf"))]
    if capped:
        notes.append(f"pos_weight reached its cap ({train_config['pos_weight_cap']:g}) for {', '.join(capped)}: "
                     f"these attributes are rarer than the loss fully compensates.")
    if metrics["data"]["skipped_images"]:
        notes.append(f"{metrics['data']['skipped_images']} unreadable image(s) were skipped; they are listed in "
                     f"metrics.json.")
    if train_config.get("max_steps"):
        notes.append(f"A short run (stopped at --max-steps {train_config['max_steps']}): not a finished model.")
    elif metrics["best_epoch"] == metrics["epochs_run"] == train_config.get("epochs"):
        notes.append(f"The best epoch was the last of the {metrics['epochs_run']} allowed: validation mAP was still "
                     f"rising, so a longer run (--epochs) would likely do better.")
    return notes


# ---------------------------------------------------------------- errors and tokens


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """A Hub id must be namespace/name: the namespace says whose account receives the push."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise AttrclfError(f"{what} '{repo_id}' is not a valid Hub id: {e}") from e
    if repo_id.count("/") != 1:
        raise AttrclfError(f"{what} '{repo_id}' needs a namespace: write it as your-username/{repo_id.split('/')[-1]}")
    return repo_id


def require_token(action: str, advice: str = "") -> str:
    """The token huggingface_hub would send (HF_TOKEN, then the `hf auth login` file); an AttrclfError when none."""
    token = get_token()
    if not token:
        raise AttrclfError(f"cannot {action}: no Hugging Face token. Log in with `hf auth login` or set HF_TOKEN to "
                           f"a token with write access. {advice}".strip())
    return token


def check_can_push(repo_id: str) -> None:
    """Fail before training, not after it, when the push at the end could not start."""
    check_repo_id(repo_id, "--push-to-hub")
    require_token(f"push to '{repo_id}'", "Or train without --push-to-hub and push later with "
                                          "`python -m attrclf.hub push OUTPUT_DIR REPO_ID`.")


@contextmanager
def hub_errors(action: str, repo_id: str, advice: str = ""):
    """Turn what huggingface_hub raises into one AttrclfError: what failed, on which repo, and what to do."""
    try:
        yield
    except OfflineModeIsEnabled as e:
        raise AttrclfError(f"cannot {action}: HF_HUB_OFFLINE is set, so huggingface_hub makes no network calls. "
                           f"Unset it. {advice}".strip()) from e
    except LocalEntryNotFoundError as e:  # downloads: the Hub could not be asked and the cache lacks the file
        raise AttrclfError(f"cannot {action}: '{repo_id}' is not in the local Hugging Face cache and the Hub at "
                           f"{constants.ENDPOINT} could not be asked (no network, or HF_HUB_OFFLINE set). "
                           f"{advice}".strip()) from e
    except httpx2.TransportError as e:
        raise AttrclfError(f"cannot {action}: the Hub at {constants.ENDPOINT} is unreachable ({type(e).__name__}: "
                           f"{e}). Check the network (and HF_ENDPOINT, if set). {advice}".strip()) from e
    except HfHubHTTPError as e:
        raise AttrclfError(f"cannot {action}: {describe_http_error(e, repo_id)} {advice}".strip()) from e
    except ValueError as e:  # huggingface_hub's check of the card's metadata (POST /api/validate-yaml)
        if "metadata" not in str(e):
            raise
        raise AttrclfError(f"cannot {action}: the Hub rejected the card's metadata: {e} {advice}".strip()) from e


def describe_http_error(error: HfHubHTTPError, repo_id: str) -> str:
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return (f"the Hub did not accept the token for '{repo_id}' (HTTP 401): it is missing, wrong or expired, or the "
                f"repo is private to another account. Log in with `hf auth login` or set HF_TOKEN.")
    if status == 403:
        return f"the token may not write to '{repo_id}' (HTTP 403): use a token with write access to its namespace."
    if isinstance(error, RevisionNotFoundError):
        return f"'{repo_id}' has no such revision (branch, tag or commit)."
    if isinstance(error, EntryNotFoundError):
        return f"'{repo_id}' lacks a file attrclf needs: is it an attrclf model repo?"
    if isinstance(error, RepositoryNotFoundError):
        return f"'{repo_id}' does not exist on the Hub (or is private and the token cannot read it)."
    message = error.server_message or str(error).strip().splitlines()[0]
    return f"the Hub answered HTTP {status} for '{repo_id}': {message}"


# ---------------------------------------------------------------- push a model


def is_package_file(name: str) -> bool:
    """Whether a path in a model repo belongs to the attrclf package (and is replaced by each push)."""
    return name in MODEL_FILES or (name.endswith(".png") and "/" not in name)


def model_files(folder: Path) -> list[Path]:
    """The files of the model package in a training output folder, in name order."""
    if not folder.is_dir():
        raise AttrclfError(f"'{folder}' is not a folder: pass the --output-dir of a training run")
    missing = [name for name in REQUIRED_MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise AttrclfError(f"'{folder}' has no {' or '.join(missing)}: is it a training output folder "
                           f"(train.py --output-dir)?")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_package_file(p.name))


def card_for_push(folder: Path, repo_id: str) -> bytes | None:
    """The folder's card rendered again so that its usage lines name `repo_id`; None without the run's reports."""
    sources = [folder / name for name in ("config.json", "metrics.json", "train_config.json")]
    if not all(path.is_file() for path in sources):
        return None
    config, metrics, train_config = (json.loads(path.read_text()) for path in sources)
    images = tuple(name for name in CARD_IMAGES if (folder / name).is_file())
    return str(render_card(config, metrics, train_config, repo_id, images)).encode()


def push_operations(folder: Path, repo_id: str, remote_files: list[str]) -> list:
    """One commit's operations: add every package file, and delete the package files of an earlier push that this
    folder lacks (a stale metrics.json or plot must not sit beside new weights). Other files in the repo stay."""
    contents: dict[str, str | bytes] = {path.name: str(path) for path in model_files(folder)}
    card = card_for_push(folder, repo_id)
    if card:
        contents["README.md"] = card
    return [CommitOperationAdd(name, content) for name, content in sorted(contents.items())] + [
        CommitOperationDelete(name) for name in remote_files if is_package_file(name) and name not in contents]


def push_model(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Push a trained model folder to a Hub model repo in one commit; returns the commit URL.

    Args:
        folder: A training output folder (model.safetensors, config.json, card, reports, plots).
        repo_id: namespace/name; created when missing (`private` applies only then).
        private: Create the repo private.
        revision: Branch to commit to, created from main when missing; default main.
    """
    folder = Path(folder)
    model_files(folder)  # a wrong folder fails before any network call
    check_repo_id(repo_id)
    advice = (f"Nothing in '{folder}' was changed; once fixed, run `python -m attrclf.hub push {folder} {repo_id}` "
              f"again.")
    token = require_token(f"push to '{repo_id}'", advice)
    with hub_errors(f"push to '{repo_id}'", repo_id, advice):
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = push_operations(folder, repo_id, api.list_repo_files(repo_id, revision=revision))
        commit = api.create_commit(repo_id, operations, revision=revision,
                                   commit_message=f"attrclf model from {folder.resolve().name}/")
    return commit.commit_url


# ---------------------------------------------------------------- push the Space


def runtime_requirements(text: str) -> str:
    """requirements.txt for a Space: the lines above the '# tests' section, without known test tools."""
    keep = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith("# tests"):
            break
        name = re.split(r"[<>=!~\[;\s]", stripped, maxsplit=1)[0].lower()
        if name in TEST_TOOLS or name.startswith("pytest"):
            continue
        keep.append(line)
    return "\n".join(keep).strip() + "\n"


def gradio_version(requirements: str) -> str:
    """The pinned gradio of requirements.txt, else the installed one (without importing it)."""
    pinned = re.search(r"^gradio==(\S+)", requirements, re.MULTILINE)
    return pinned.group(1) if pinned else metadata.version("gradio")


def space_readme(space_id: str, model_id: str, license: str, sdk_version: str) -> str:
    """The Space's README.md: the front matter the Hub reads (sdk, app file, linked model), and what it runs."""
    card_data = SpaceCardData(title=space_id.split("/")[-1], sdk="gradio", sdk_version=sdk_version,
                              app_file="app.py", models=[model_id], license=license, emoji="🏷️", colorFrom="indigo",
                              colorTo="blue", short_description=SPACE_SHORT_DESCRIPTION, pinned=False)
    return (
        f"---\n{card_data.to_yaml()}\n---\n\n# {space_id.split('/')[-1]}\n\n"
        f"The attrclf Gradio app (`app.py`) serving [{model_id}]({constants.ENDPOINT}/{model_id}): upload an image, "
        f"get one probability per attribute and PRESENT / absent at the model's tuned thresholds.\n\n"
        f"The model comes from the Space variable `{SPACE_VARIABLE}` (set to `{model_id}` by "
        f"`python -m attrclf.hub push-space`); change it in the Space settings to serve another attrclf model. "
        f"If that model is private, add a secret `HF_TOKEN` that can read it.\n"
    )


def space_files(source: Path, space_id: str, model_id: str, license: str) -> dict[str, bytes]:
    """{path in the Space: content}: app.py, the attrclf package, runtime requirements and the Space card."""
    for needed in ("app.py", "requirements.txt", "attrclf/__init__.py"):
        if not (source / needed).is_file():
            raise AttrclfError(f"'{source}' has no {needed}: the Space is built from an attrclf checkout that has "
                               f"app.py, requirements.txt and the attrclf package; point --source at one")
    requirements = (source / "requirements.txt").read_text()
    files = {"app.py": (source / "app.py").read_bytes(),
             "requirements.txt": runtime_requirements(requirements).encode(),
             "README.md": space_readme(space_id, model_id, license, gradio_version(requirements)).encode()}
    for path in sorted((source / "attrclf").rglob("*.py")):
        if "__pycache__" not in path.parts:
            files[path.relative_to(source).as_posix()] = path.read_bytes()
    return files


def push_space(space_id: str, model_id: str, source: str | Path | None = None, private: bool = False,
               license: str = "apache-2.0") -> str:
    """Push the Gradio Space that serves `model_id` (which must be on the Hub); returns the commit URL."""
    check_repo_id(space_id, "Space id")
    check_repo_id(model_id, "--model")
    files = space_files(Path(source) if source else ROOT, space_id, model_id, license)
    token = require_token(f"push the Space '{space_id}'")
    api = HfApi(token=token)
    with hub_errors(f"find the model '{model_id}'", model_id,
                    f"Push it first: `python -m attrclf.hub push OUTPUT_DIR {model_id}`."):
        api.model_info(model_id)
    with hub_errors(f"push the Space '{space_id}'", space_id):
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        commit = api.create_commit(space_id, [CommitOperationAdd(path, data) for path, data in files.items()],
                                   repo_type="space", commit_message=f"attrclf Space serving {model_id}")
        api.add_space_variable(space_id, SPACE_VARIABLE, model_id,
                               description="Hub id (or folder) of the attrclf model the app serves")
    return commit.commit_url


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attrclf.hub",
                                     description="Push a trained attrclf model, or its Gradio Space, to the Hub.")
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="push a training output folder to a Hub model repo (one commit)")
    push.add_argument("output_dir", help="the --output-dir of a training run")
    push.add_argument("repo_id", help="Hub model repo, namespace/name (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                             "visibility)")
    push.add_argument("--revision", default=None, help="branch to push to, created from main when missing "
                                                       "(default: main)")
    space = commands.add_parser("push-space", help="push the Gradio Space that serves a model from the Hub")
    space.add_argument("space_id", help="Hub Space, namespace/name (created when missing)")
    space.add_argument("--model", required=True, help="Hub id of the model the Space serves (pushed before)")
    space.add_argument("--source", default=None, help=f"attrclf checkout holding app.py (default: {ROOT})")
    space.add_argument("--private", action="store_true", help="create the Space private")
    space.add_argument("--license", default="apache-2.0", help="license in the Space's front matter")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "push":
            url = push_model(args.output_dir, args.repo_id, args.private, args.revision)
            print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
        else:
            url = push_space(args.space_id, args.model, args.source, args.private, args.license)
            print(f"pushed the Space {args.space_id} (serving {args.model}, variable {SPACE_VARIABLE}): {url}")
    except AttrclfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
