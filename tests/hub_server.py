"""A small Hugging Face Hub-compatible HTTP server for the tests: stdlib, plus PyYAML (a huggingface_hub dependency).

It answers the requests huggingface_hub 2.4 sends for what attrclf does, as the Hub answers them (read from the
client: hf_api.py, _commit_api.py, file_download.py, _snapshot_download.py):

    POST /api/repos/create                          201 {"url"}; 409 when it exists; new repos get a .gitattributes
    POST /api/validate-yaml                         the card's front matter must be a YAML mapping (400 otherwise);
                                                    a Space's short_description must fit the Hub's 60 characters
    POST /api/{type}s/{id}/preupload/{rev}          every file "regular" (no LFS, no Xet), with the oid of the file
                                                    already there so the client skips unchanged files
    POST /api/{type}s/{id}/commit/{rev}             NDJSON: a header line, then file / deletedFile / deletedFolder
    POST /api/{type}s/{id}/branch/{branch}          409 when it exists
    GET  /api/{type}s/{id}[/revision/{rev}]         repo info: id, sha, private, siblings
    GET  /api/{type}s/{id}/tree/{rev}[/{path}]      file (and, when recursive, folder) entries
    GET/POST /api/spaces/{id}/variables             Space variables (HfApi.add_space_variable / get_space_variables)
    HEAD/GET /[{type}s/]{id}/resolve/{rev}/{path}   X-Repo-Commit, ETag (the git blob id), Content-Length

Writes need a valid token (401 otherwise); a private repo needs it for reads too. A missing repo, revision or file
is a 404 with the X-Error-Code the client maps to RepositoryNotFoundError / RevisionNotFoundError /
EntryNotFoundError. Anything else is a 404 recorded in `unhandled`, so a test sees when the client sends something new.
Blobs live in a folder (named by their git blob id); repos, commits and branches in memory.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")
INITIAL_GITATTRIBUTES = (b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                         b"*.png filter=lfs diff=lfs merge=lfs -text\n")


def git_blob_id(content: bytes) -> str:
    """The id git (and the Hub) gives a regular file: sha1 of 'blob {size}\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def now() -> str:
    """The Hub's timestamp format (milliseconds, Z), which the client parses strictly."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    oid: str
    tree: dict[str, str]  # path -> blob id
    message: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None = None
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    variables: dict[str, dict] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An HTTP error answer: status, X-Error-Code, a message (the JSON body's "error") and more body fields."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body


class FakeHub:
    """The Hub's state: repos, commits and blobs. Thread-safe; `requests` and `unhandled` record the traffic."""

    def __init__(self, root: Path, tokens: set[str]):
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tokens = set(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.counter = 0

    # ---- storage

    def store(self, content: bytes) -> str:
        blob_id = git_blob_id(content)
        (self.blobs / blob_id).write_bytes(content)
        return blob_id

    def commit(self, repo: Repo, branch: str, tree: dict[str, str], message: str) -> Commit:
        self.counter += 1
        oid = hashlib.sha1(json.dumps([repo.repo_id, branch, tree, message, self.counter]).encode()).hexdigest()
        commit = Commit(oid, tree, message, now())
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of a repo at a revision: {path: content} (for test assertions)."""
        commit = self.repos[(repo_type, repo_id)].resolve(revision)
        return {path: (self.blobs / blob_id).read_bytes() for path, blob_id in commit.tree.items()}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        return list(self.repos[(repo_type, repo_id)].commits.values())

    # ---- access

    def authorised(self, authorization: str | None) -> bool:
        return bool(authorization) and authorization.removeprefix("Bearer ").strip() in self.tokens

    def require_token(self, authorization: str | None) -> None:
        if not self.authorised(authorization):
            message = ("Invalid credentials in Authorization header" if authorization
                       else "Invalid username or password.")
            raise HubError(401, message, headers={"X-Error-Message": message})

    def repo(self, repo_type: str, repo_id: str, authorization: str | None, write: bool = False) -> Repo:
        """The repo, if this caller may see it (and write to it when `write`)."""
        if write:
            self.require_token(authorization)
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self.authorised(authorization)):
            raise HubError(401 if repo else 404, "Repository not found", "RepoNotFound")
        return repo

    def revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


class Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass made by `start`
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ---- plumbing

    def body(self) -> bytes:
        return self.data

    def answer(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        content_type = "application/octet-stream" if raw is not None else "application/json"
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def dispatch(self):
        # read the whole body first: an error answered before reading it would leave it on the kept-alive connection
        self.data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.hub.lock:
            self.hub.requests.append((self.command, url.path))
        try:
            for method, pattern, handler in ROUTES:
                match = re.fullmatch(pattern, url.path) if method == self.command else None
                if match:
                    with self.hub.lock:
                        return handler(self, parts, query)
            with self.hub.lock:
                self.hub.unhandled.append((self.command, url.path))
            raise HubError(404, f"not implemented by the test server: {self.command} {url.path}")
        except HubError as e:
            headers = {**e.headers, **({"X-Error-Code": e.code} if e.code else {})}
            if self.command == "HEAD":
                headers["X-Error-Message"] = headers.get("X-Error-Message", str(e))
            self.answer(e.status, {"error": str(e), **e.body}, headers)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = dispatch

    # ---- endpoints

    def create_repo(self, parts, query):
        self.hub.require_token(self.headers.get("Authorization"))
        payload = json.loads(self.body())
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"http://{self.headers['Host']}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=url)  # the client reads "url"
        if repo_type == "space" and payload.get("sdk") not in ("gradio", "streamlit", "docker", "static"):
            raise HubError(400, "a Space needs an sdk")
        repo = Repo(repo_type, repo_id, payload.get("visibility") == "private", payload.get("sdk"))
        self.hub.repos[(repo_type, repo_id)] = repo
        self.hub.commit(repo, "main", {".gitattributes": self.hub.store(INITIAL_GITATTRIBUTES)}, "initial commit")
        self.answer(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, parts, query):
        payload = json.loads(self.body())
        match = re.match(r"^---\n(.*?)\n---\n", payload["content"], re.DOTALL)
        errors = []
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
            if not isinstance(metadata, dict):
                errors.append("metadata must be a YAML mapping")
            elif payload.get("repoType") == "space" and len(str(metadata.get("short_description", ""))) > 60:
                errors.append('"short_description" must be at most 60 characters')
        except yaml.YAMLError as e:
            errors.append(f"YAML: {e}")
        self.answer(400 if errors else 200, {"errors": [{"message": m} for m in errors], "warnings": []})

    def preupload(self, parts, query):
        repo = self.hub.repo(parts[1][:-1], f"{parts[2]}/{parts[3]}", self.headers.get("Authorization"), write=True)
        commit = self.hub.revision(repo, parts[5])
        files = json.loads(self.body())["files"]
        self.answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                     "oid": commit.tree.get(f["path"])} for f in files]})

    def commit(self, parts, query):
        repo_type, repo_id, branch = parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[5]
        repo = self.hub.repo(repo_type, repo_id, self.headers.get("Authorization"), write=True)
        if query.get("create_pr"):
            raise HubError(400, "the test server does not do pull requests")
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "the first NDJSON line must be the header")
        tree = dict(repo.resolve(branch).tree)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                tree[value["path"]] = self.hub.store(base64.b64decode(value["content"]))
            elif line["key"] == "deletedFile":
                tree.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                tree = {p: b for p, b in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"the test server answers preupload with 'regular': unexpected {line['key']}")
        commit = self.hub.commit(repo, branch, tree, lines[0]["value"]["summary"])
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self.answer(200, {"commitUrl": f"http://{self.headers['Host']}/{prefix}{repo_id}/commit/{commit.oid}",
                          "commitOid": commit.oid, "pullRequestUrl": None, "success": True})

    def create_branch(self, parts, query):
        repo = self.hub.repo(parts[1][:-1], f"{parts[2]}/{parts[3]}", self.headers.get("Authorization"), write=True)
        branch = parts[5]
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self.hub.revision(repo, json.loads(self.body() or b"{}").get("startingPoint", "main"))
        repo.branches[branch] = start.oid
        self.answer(200, {})

    def info(self, parts, query):
        repo = self.hub.repo(parts[1][:-1], f"{parts[2]}/{parts[3]}", self.headers.get("Authorization"))
        commit = self.hub.revision(repo, parts[5] if len(parts) > 5 else "main")
        payload = {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "lastModified": commit.date,
                   "siblings": [{"rfilename": path} for path in sorted(commit.tree)], "tags": []}
        if repo.sdk:
            payload["sdk"] = repo.sdk
        self.answer(200, payload)

    def tree(self, parts, query):
        repo = self.hub.repo(parts[1][:-1], f"{parts[2]}/{parts[3]}", self.headers.get("Authorization"))
        commit = self.hub.revision(repo, parts[5])
        base = "/".join(parts[6:])
        recursive = query.get("recursive", "false").lower() == "true"
        entries, folders = [], set()
        for path, blob_id in sorted(commit.tree.items()):
            if base and not path.startswith(base + "/"):
                continue
            parents = path.split("/")[:-1]
            depth = base.count("/") + 1 if base else 0  # parents[:depth] is `base` itself
            if len(parents) > depth and not recursive:
                folders.add("/".join(parents[: depth + 1]))
                continue
            folders.update("/".join(parents[:i]) for i in range(depth + 1, len(parents) + 1))
            entries.append({"type": "file", "oid": blob_id, "size": (self.hub.blobs / blob_id).stat().st_size,
                            "path": path})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self.answer(200, entries)

    def variables(self, parts, query):
        write = self.command == "POST"
        repo = self.hub.repo("space", f"{parts[2]}/{parts[3]}", self.headers.get("Authorization"), write=write)
        if write:
            payload = json.loads(self.body())
            repo.variables[payload["key"]] = {"value": payload["value"], "description": payload.get("description"),
                                              "updatedAt": now()}
        self.answer(200, repo.variables)

    def resolve(self, parts, query):
        offset = 1 if parts[0] in ("datasets", "spaces") else 0
        repo_type = parts[0][:-1] if offset else "model"
        repo = self.hub.repo(repo_type, f"{parts[offset]}/{parts[offset + 1]}", self.headers.get("Authorization"))
        commit = self.hub.revision(repo, parts[offset + 3])
        path = "/".join(parts[offset + 4 :])
        if path not in commit.tree:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = (self.hub.blobs / commit.tree[path]).read_bytes()
        self.answer(200, headers={"X-Repo-Commit": commit.oid, "ETag": f'"{commit.tree[path]}"'}, raw=content)


_REPO = r"/api/(?:model|dataset|space)s/[^/]+/[^/]+"
ROUTES = [
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", _REPO + r"/preupload/[^/]+", Handler.preupload),
    ("POST", _REPO + r"/commit/[^/]+", Handler.commit),
    ("POST", _REPO + r"/branch/[^/]+", Handler.create_branch),
    ("GET", _REPO + r"(?:/revision/[^/]+)?", Handler.info),
    ("GET", _REPO + r"/tree/[^/]+(?:/.*)?", Handler.tree),
    ("GET", r"/api/spaces/[^/]+/[^/]+/variables", Handler.variables),
    ("POST", r"/api/spaces/[^/]+/[^/]+/variables", Handler.variables),
    ("HEAD", r"/(?:(?:dataset|space)s/)?[^/]+/[^/]+/resolve/[^/]+/.+", Handler.resolve),
    ("GET", r"/(?:(?:dataset|space)s/)?[^/]+/[^/]+/resolve/[^/]+/.+", Handler.resolve),
]


def start(root: Path, tokens: set[str]) -> tuple[ThreadingHTTPServer, FakeHub, str]:
    """A server on 127.0.0.1 at a free port, serving from a daemon thread. Returns (server, hub, endpoint URL)."""
    hub = FakeHub(root, tokens)
    handler = type("BoundHandler", (Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, hub, f"http://127.0.0.1:{server.server_address[1]}"
