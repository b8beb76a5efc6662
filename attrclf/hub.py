"""Pushing a trained model folder, or the Gradio Space that serves it, to the Hub (the card itself is card.py).

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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx2  # huggingface_hub 2.4's HTTP client: its transport errors mean "the Hub is unreachable"
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
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

from .card import CARD_IMAGES, render_card
from .errors import AttrclfError, run_cli

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent  # the checkout, when attrclf runs from one
SPACE_BUNDLE = "_space"  # a wheel's copy of app.py and requirements.txt (pyproject.toml force-includes them)
# What a model repo holds: the package, the reports and the plots; never checkpoints or staging folders.
MODEL_FILES = ("model.safetensors", "config.json", "README.md", "metrics.json", "train_config.json", "history.json",
               "model.onnx", "model.int8.onnx")  # the ONNX exports (attrclf export) that Predictor's backends run
REQUIRED_MODEL_FILES = ("model.safetensors", "config.json")
SPACE_VARIABLE = "ATTRCLF_MODEL"  # app.py serves the model this names (a Hub id or a folder)
SPACE_SHORT_DESCRIPTION = "Multilabel image attributes (1/0/NA) with attrclf"  # the Hub allows 60 characters
TEST_TOOLS = {"pytest", "playwright", "ruff", "scikit-learn", "onnx", "onnxscript", "coverage"}  # onnxruntime serves


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
    return str(render_card(config, metrics, train_config, repo_id, images=images)).encode()


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


@dataclass
class SpaceSource:
    """Where push-space reads the Space's files: an attrclf checkout (--source), or the installed package.

    Attributes:
        app: The app.py the Space runs.
        requirements: The requirements.txt whose runtime part the Space installs.
        package: The attrclf folder whose *.py files the Space imports.
    """

    app: Path
    requirements: Path
    package: Path

    @classmethod
    def checkout(cls, root: str | Path) -> "SpaceSource":
        root = Path(root)
        for needed in ("app.py", "requirements.txt", "attrclf/__init__.py"):
            if not (root / needed).is_file():
                raise AttrclfError(f"'{root}' has no {needed}: the Space is built from an attrclf checkout that has "
                                   f"app.py, requirements.txt and the attrclf package; point --source at one")
        return cls(root / "app.py", root / "requirements.txt", root / "attrclf")

    @classmethod
    def installed(cls) -> "SpaceSource":
        """The running attrclf: a wheel carries app.py and requirements.txt in attrclf/_space/; a checkout has them
        beside the package."""
        bundle = PACKAGE / SPACE_BUNDLE
        if (bundle / "app.py").is_file() and (bundle / "requirements.txt").is_file():
            return cls(bundle / "app.py", bundle / "requirements.txt", PACKAGE)
        return cls.checkout(ROOT)


def space_files(source: SpaceSource, space_id: str, model_id: str, license: str) -> dict[str, bytes]:
    """{path in the Space: content}: app.py, the attrclf package, runtime requirements and the Space card."""
    requirements = source.requirements.read_text()
    files = {"app.py": source.app.read_bytes(),
             "requirements.txt": runtime_requirements(requirements).encode(),
             "README.md": space_readme(space_id, model_id, license, gradio_version(requirements)).encode()}
    for path in sorted(source.package.rglob("*.py")):
        inner = path.relative_to(source.package).parts
        if "__pycache__" not in inner and inner[0] != SPACE_BUNDLE:
            files[f"attrclf/{path.relative_to(source.package).as_posix()}"] = path.read_bytes()
    return files


def push_space(space_id: str, model_id: str, source: str | Path | None = None, *, private: bool = False,
               license: str = "apache-2.0") -> str:
    """Push the Gradio Space that serves `model_id` (which must be on the Hub); returns the commit URL.

    Args:
        space_id: namespace/name of the Space (created when missing).
        model_id: Hub id of the model it serves.
        source: An attrclf checkout to take app.py, requirements.txt and the package from; default the running
            attrclf (installed or checkout).
        private: Create the Space private.
        license: The license in the Space's front matter.
    """
    check_repo_id(space_id, "Space id")
    check_repo_id(model_id, "--model")
    files = space_files(SpaceSource.checkout(source) if source else SpaceSource.installed(), space_id, model_id,
                        license)
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
    space.add_argument("--source", default=None, help="attrclf checkout holding app.py and requirements.txt "
                                                     "(default: the running attrclf, installed or checkout)")
    space.add_argument("--private", action="store_true", help="create the Space private")
    space.add_argument("--license", default="apache-2.0", help="license in the Space's front matter")
    return parser


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "push":
        url = push_model(args.output_dir, args.repo_id, private=args.private, revision=args.revision)
        print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
    else:
        url = push_space(args.space_id, args.model, args.source, private=args.private, license=args.license)
        print(f"pushed the Space {args.space_id} (serving {args.model}, variable {SPACE_VARIABLE}): {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m attrclf.hub push|push-space ...`; bad input is one line on stderr and exit code 2."""
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
