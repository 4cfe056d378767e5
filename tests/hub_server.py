"""A small fake of the Hugging Face Hub HTTP API, for tests that must run offline.

Two kinds of model repos:

* read-only ones, served from directories at one fixed commit: `FakeHub({"org/tiny": Path(...)})`;
* writable ones, held in memory, owned by their namespace: made through the API (`create_repo`)
  or pre-seeded with `hub.add_repo("bob/taken", {"README.md": b"..."})`. Every commit gets a new
  sha, is recorded in `hub.commits[repo]`, and every past commit stays readable by its sha.

Users exist only as tokens: `FakeHub(tokens={"hf_alice": "alice"}, orgs={"acme": {"alice"}})`.
It speaks the subset of the API that huggingface_hub 2.x uses for `whoami`, `create_repo`,
`repo_info`/`model_info`/`repo_exists`, `list_repo_tree`, `create_commit`/`upload_folder`,
`hf_hub_download` and `snapshot_download`:

    GET  /api/whoami-v2                                       the token's user and orgs
    POST /api/repos/create                                    new repo (409 exists, 403 not your namespace)
    POST /api/validate-yaml                                   README metadata check (always fine)
    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]     repo info (id, sha, private, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]               file listing (recursive or not)
    POST /api/models/{repo}/preupload/{rev}                   upload mode per file: "lfs" or "regular"
    POST /{repo}.git/info/lfs/objects/batch                   LFS batch API, "basic" transfer only
    PUT  /lfs-upload/{ticket}                                 the bytes, to a one-time URL (like S3: no token)
    POST /{repo}.git/info/lfs/objects/verify                  LFS verify action
    POST /api/models/{repo}/commit/{rev}                      NDJSON commit: file, lfsFile, deletedFile, deletedFolder
    GET  /api/models/{repo}/xet-{read,write}-token/{rev}      refused (403): this hub has no Xet storage
    HEAD /{repo}/resolve/{rev}/{file}                         file metadata (X-Repo-Commit, ETag, size)
    GET  /{repo}/resolve/{rev}/{file}                         file content (honours `Range: bytes=N-`)

Rules, as on the real hub: files named *.safetensors, *.bin, *.pth, *.gguf are LFS files (tree
`oid` = git sha1 of the LFS pointer, `lfs.oid` = sha256 of the content); other files are regular
git blobs (`oid` = git sha1 of the content). A write needs `Authorization: Bearer <known token>`
(else 401 "Invalid credentials in Authorization header") and a namespace that is the user's or one
of their orgs' (else 403). A private repo, like a missing one, answers RepoNotFound to everyone
else: 401 without a valid token, 404 with one. Reads treat an unknown token as anonymous. Errors
carry `X-Error-Code` / `X-Error-Message`, which huggingface_hub maps to its exception classes.
Every request is recorded in `hub.requests` as {"method", "path", "authorization"}; the token is
kept nowhere else.

Xet: huggingface_hub 2.x decides on the client side alone whether LFS content goes through Xet:
`_commit_api._upload_files` and `HfApi.upload_folder` call `utils._runtime.is_xet_available()`,
which is "hf_xet importable and not constants.HF_HUB_DISABLE_XET"; no server answer is consulted
(the LFS batch API, which could name a transfer, is only reached when Xet is off). So tests turn
Xet off in the client: `hub.patched_client()` sets the constant in this process, `hub.env()` gives
the environment for a subprocess. The code under test needs nothing. A client left on Xet fails
fast: the Xet token is refused with a 403, which hf_xet does not retry.

Pointing huggingface_hub at it (a subprocess: `env={**os.environ, **hub.env()}`):

    with FakeHub(tokens={"hf_alice": "alice"}) as hub, hub.patched_client():
        HfApi(token="hf_alice").upload_folder(repo_id="alice/m", folder_path=...)
        hf_hub_download("alice/m", "config.json", token="hf_alice", cache_dir=...)
        hub.commits["alice/m"], hub.contents("alice/m")   # what was published

`patched_client()` sets huggingface_hub.constants ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE,
HF_HUB_DISABLE_XET=True and HF_HUB_OFFLINE=False, and restores them; in pytest the same four
`monkeypatch.setattr(constants, ...)` calls do (see the `hub` fixture of tests/test_download.py).
`HfApi(endpoint=hub.endpoint, token=...)` works too, but still needs Xet off to upload LFS files.
"""

import base64
import hashlib
import json
import re
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")
BAD_TOKEN = "Invalid credentials in Authorization header"  # the hub's words; huggingface_hub knows them


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """What git itself stores for an LFS file."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        hashlib.sha256(data).hexdigest().encode(), len(data))


def tree_entry(name: str, data: bytes) -> dict:
    if not name.endswith(LFS_SUFFIXES):
        return {"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
    pointer = lfs_pointer(data)
    return {"type": "file", "path": name, "size": len(data), "oid": git_sha1(pointer),
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}


class HubError(Exception):
    """An error answer: status, X-Error-Message, and the X-Error-Code huggingface_hub dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.body = status, message, code, commit, body or {}


@dataclass
class Repo:
    """A writable repo: one {path: bytes} snapshot per commit, and its LFS store (sha256 -> bytes)."""
    private: bool
    head: str
    snapshots: dict[str, dict[str, bytes]]
    lfs: dict[str, bytes] = field(default_factory=dict)


class FakeHub:
    """`with FakeHub({"org/tiny": Path(...)}, tokens={"hf_x": "alice"}) as hub:` serves on hub.endpoint."""

    def __init__(self, repos: dict[str, Path] | None = None, commit: str = COMMIT, refs=("main",), *,
                 tokens: dict[str, str] | None = None, orgs: dict[str, set[str]] | None = None):
        self.repos = {repo: Path(d) for repo, d in (repos or {}).items()}  # read-only, from directories
        self.commit = commit
        self.refs = set(refs)
        self.tokens = dict(tokens or {})  # token -> user name
        self.orgs = {org: set(members) for org, members in (orgs or {}).items()}
        self.hosted: dict[str, Repo] = {}  # writable, in memory
        self.commits: dict[str, list[dict]] = {}  # repo -> [{"sha", "message", "operations", "user"}]
        self.requests: list[dict] = []  # {"method", "path", "authorization"}
        self._tickets: dict[str, tuple[str, str, int]] = {}  # LFS upload URL -> (repo, sha256, size)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- for tests ---------------------------------------------------------------------------

    def add_repo(self, repo: str, files: dict[str, bytes | str] | None = None, private: bool = False) -> str:
        """Pre-seed a writable repo, owned by its namespace; returns its commit sha."""
        files = {p: d.encode() if isinstance(d, str) else d for p, d in (files or {}).items()}
        with self._lock:
            if repo in self.repos or repo in self.hosted:
                raise ValueError(f"{repo} exists")
            sha = hashlib.sha1(f"created {repo}".encode()).hexdigest()
            lfs = {hashlib.sha256(d).hexdigest(): d for p, d in files.items() if p.endswith(LFS_SUFFIXES)}
            self.hosted[repo] = Repo(private, sha, {sha: files}, lfs)
            self.commits[repo] = []
            return sha

    def contents(self, repo: str, rev: str = "main") -> dict[str, bytes]:
        """The repo's files at `rev` (a branch or commit sha) as {path: bytes}, whoever may see them."""
        _, files = self.lookup(repo, rev, user=repo.split("/")[0])
        return {name: data.read_bytes() if isinstance(data, Path) else data for name, data in files.items()}

    def files(self, repo: str) -> list[str]:
        return sorted(self.contents(repo))

    def env(self) -> dict[str, str]:
        """Environment for a subprocess whose huggingface_hub should publish here."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}

    @contextmanager
    def patched_client(self):
        """Point this process's huggingface_hub here, Xet uploads off (the constants are read per call)."""
        from huggingface_hub import constants

        with mock.patch.multiple(constants, ENDPOINT=self.endpoint, HF_HUB_DISABLE_XET=True, HF_HUB_OFFLINE=False,
                                 HUGGINGFACE_CO_URL_TEMPLATE=self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"):
            yield self

    # --- the hub's rules ---------------------------------------------------------------------

    def user(self, authorization: str | None) -> str | None:
        token = authorization[len("Bearer "):] if authorization and authorization.startswith("Bearer ") else None
        return self.tokens.get(token)

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def lookup(self, repo: str, rev: str, user: str | None) -> tuple[str, dict[str, bytes | Path]]:
        """(commit, {path: bytes or file}) of `repo` at `rev`, as `user` may see it."""
        hosted = self.hosted.get(repo)
        if repo not in self.repos and (hosted is None or hosted.private and not self.can_write(user, repo.split("/")[0])):
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        if hosted is None:
            if rev != self.commit and rev not in self.refs:
                raise HubError(404, "Invalid rev id: " + rev, "RevisionNotFound")
            root = self.repos[repo]
            return self.commit, {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        sha = hosted.head if rev == "main" else rev
        if sha not in hosted.snapshots:
            raise HubError(404, "Invalid rev id: " + rev, "RevisionNotFound")
        return sha, hosted.snapshots[sha]

    def writable(self, repo: str, user: str | None) -> Repo:
        if user is None:
            raise HubError(401, BAD_TOKEN)
        self.lookup(repo, "main", user)  # a repo you cannot see is not found
        if repo not in self.hosted or not self.can_write(user, repo.split("/")[0]):
            raise HubError(403, f'You don\'t have the rights to push to "{repo}"')
        return self.hosted[repo]

    def create(self, user: str | None, body: dict) -> dict:
        if user is None:
            raise HubError(401, BAD_TOKEN)
        if body.get("type", "model") != "model":
            raise HubError(400, "FakeHub only hosts model repos")
        namespace = body.get("organization") or user
        repo = f"{namespace}/{body['name']}"
        if not self.can_write(user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        try:
            self.add_repo(repo, private=body.get("visibility") == "private")
        except ValueError:
            raise HubError(409, "You already created this model repo", body={"url": f"{self.endpoint}/{repo}"}) from None
        return {"url": f"{self.endpoint}/{repo}", "name": repo}

    def commit_ndjson(self, repo: str, user: str | None, rev: str, lines: list[dict]) -> dict:
        with self._lock:
            hosted = self.writable(repo, user)
            if rev != "main":
                raise HubError(404, "FakeHub commits to main only: " + rev, "RevisionNotFound")
            files, ops, header = dict(hosted.snapshots[hosted.head]), [], {}
            for line in lines:
                key, value = line["key"], line["value"]
                path = value.get("path", "")
                if key == "header":
                    header = value
                elif key == "file":
                    files[path] = base64.b64decode(value["content"])
                    ops.append(("add", path))
                elif key == "lfsFile":
                    if value["oid"] not in hosted.lfs:
                        raise HubError(422, f"LFS object {value['oid']} of {path} was never uploaded")
                    files[path] = hosted.lfs[value["oid"]]
                    ops.append(("add", path))
                elif key in ("deletedFile", "deletedFolder"):
                    gone = [f for f in files if f == path or key == "deletedFolder" and f.startswith(path.rstrip("/") + "/")]
                    if not gone:
                        raise HubError(404, "A file with this name doesn't exist: " + path, "EntryNotFound")
                    for f in gone:
                        del files[f]
                    ops.append(("delete", path))
                else:
                    raise HubError(400, f"FakeHub does not support commit operation {key!r}")
            if header.get("parentCommit") not in (None, hosted.head):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            message = header.get("summary", "")
            sha = hashlib.sha1(json.dumps([hosted.head, message, ops, user]).encode()).hexdigest()
            hosted.snapshots[sha], hosted.head = files, sha
            self.commits[repo].append({"sha": sha, "message": message, "operations": ops, "user": user})
        return {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo}/commit/{sha}",
                "pullRequestUrl": None}

    def lfs_batch(self, repo: str, user: str | None, body: dict) -> dict:
        hosted = self.writable(repo, user)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(422, "FakeHub takes LFS uploads through the basic transfer only")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in hosted.lfs:  # else: already there, nothing to send
                ticket = secrets.token_hex(16)
                with self._lock:
                    self._tickets[ticket] = (repo, oid, size)
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}"},
                                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, ticket: str, data: bytes) -> None:
        with self._lock:
            if ticket not in self._tickets:
                raise HubError(403, "Request has expired or the signature does not match")
            repo, oid, size = self._tickets[ticket]
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, "The uploaded content does not match the announced sha256 and size")
            del self._tickets[ticket]
            self.hosted[repo].lfs[oid] = data


def _handler_for(hub: FakeHub):
    R = r"([^/]+/[^/]+)"  # a repo id; routes match on the quoted path: a revision refs/pr/1 is refs%2Fpr%2F1

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._dispatch()

        do_GET = do_POST = do_PUT = do_HEAD

        def _dispatch(self):
            url = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            hub.requests.append({"method": self.command, "path": unquote(url.path), "authorization": auth})
            self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
            self.user = hub.user(auth)
            for method, pattern, handler in self.routes:
                if self.command in method.split() and (m := re.fullmatch(pattern, url.path)):
                    try:
                        return handler(self, *(unquote(g) if g else g for g in m.groups()))
                    except HubError as e:
                        return self._error(e)
            self._error(HubError(404, "Not found", "EntryNotFound"))

        # --- reads ---------------------------------------------------------------------------

        def _whoami(self):
            if self.user is None:
                raise HubError(401, BAD_TOKEN)
            orgs = sorted(org for org, members in hub.orgs.items() if self.user in members)
            self._json({"type": "user", "name": self.user, "fullname": self.user.title(),
                        "orgs": [{"type": "org", "name": org} for org in orgs],
                        "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

        def _repo_info(self, repo: str, rev: str | None):
            sha, files = hub.lookup(repo, rev or "main", self.user)
            siblings = [{"rfilename": name} for name in files]
            if self.query.get("blobs", "").lower() == "true":
                for s in siblings:
                    e = self._entry(s["rfilename"], files)
                    s.update(size=e["size"], blobId=e["oid"])
                    if "lfs" in e:
                        s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
            self._json({"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": sha,
                        "private": repo in hub.hosted and hub.hosted[repo].private, "siblings": siblings})

        def _tree(self, repo: str, rev: str, prefix: str | None):
            _, files = hub.lookup(repo, rev, self.user)
            recursive = self.query.get("recursive", "false").lower() == "true"
            prefix = prefix.strip("/") + "/" if prefix and prefix.strip("/") else ""
            entries, folders = [], set()
            for name in files:
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                if recursive or "/" not in rest:
                    entries.append(self._entry(name, files))
                if "/" in rest:
                    parts = rest.split("/")[:-1]
                    depth = len(parts) if recursive else 1
                    folders.update(prefix + "/".join(parts[:i + 1]) for i in range(depth))
            entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
            self._json(entries)

        @staticmethod
        def _entry(name: str, files: dict) -> dict:
            data = files[name]
            return tree_entry(name, data.read_bytes() if isinstance(data, Path) else data)

        def _resolve(self, repo: str, rev: str, name: str):
            sha, files = hub.lookup(repo, rev, self.user)
            if name not in files:
                raise HubError(404, "Entry not found", "EntryNotFound", commit=sha)
            data = files[name].read_bytes() if isinstance(files[name], Path) else files[name]
            start = 0
            if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start = min(int(m[1]), len(data))
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data[start:])

        # --- writes --------------------------------------------------------------------------

        def _create(self):
            self._json(hub.create(self.user, json.loads(self._body())))

        def _validate_yaml(self):
            self._body()
            self._json({"errors": [], "warnings": []})

        def _preupload(self, repo: str, rev: str):
            hub.writable(repo, self.user)
            _, current = hub.lookup(repo, rev, self.user)
            answer = []
            for f in json.loads(self._body())["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES)
                there = current.get(f["path"])
                oid = None if there is None else hashlib.sha256(there).hexdigest() if lfs else git_sha1(there)
                answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                               "shouldIgnore": False, "oid": oid})
            self._json({"files": answer})

        def _commit(self, repo: str, rev: str):
            if self.query.get("create_pr"):
                raise HubError(400, "FakeHub has no pull requests")
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            self._json(hub.commit_ndjson(repo, self.user, rev, lines))

        def _lfs(self, repo: str, action: str):
            body = json.loads(self._body())
            if action == "batch":
                return self._json(hub.lfs_batch(repo, self.user, body))
            if body["oid"] not in hub.writable(repo, self.user).lfs:
                raise HubError(404, "LFS object not found: " + body["oid"])
            self._json({"oid": body["oid"], "size": body["size"]})

        def _lfs_put(self, ticket: str):
            hub.lfs_put(ticket, self._body())
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _xet_token(self, repo: str, kind: str, rev: str | None):
            raise HubError(403, "FakeHub has no Xet storage: turn Xet off in the client "
                                "(FakeHub.patched_client, or HF_HUB_DISABLE_XET=1 from FakeHub.env)")

        routes = [
            ("GET HEAD", r"/api/whoami-v2", _whoami),
            ("GET HEAD", rf"/api/models/{R}(?:/revision/([^/]+))?", _repo_info),
            ("GET HEAD", rf"/api/models/{R}/tree/([^/]+)(?:/(.*))?", _tree),
            ("GET HEAD", rf"/api/models/{R}/xet-(read|write)-token(?:/([^/]+))?", _xet_token),
            ("GET HEAD", rf"/{R}/resolve/([^/]+)/(.+)", _resolve),
            ("POST", r"/api/repos/create", _create),
            ("POST", r"/api/validate-yaml", _validate_yaml),
            ("POST", rf"/api/models/{R}/preupload/([^/]+)", _preupload),
            ("POST", rf"/api/models/{R}/commit/([^/]+)", _commit),
            ("POST", rf"/{R}\.git/info/lfs/objects/(batch|verify)", _lfs),
            ("PUT", r"/lfs-upload/([0-9a-f]+)", _lfs_put),
        ]

        # --- plumbing ------------------------------------------------------------------------

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    data += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return data
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, obj, status: int = 200, headers: dict | None = None):
            body = json.dumps(obj).encode()
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, e: HubError):
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._json({"error": e.message, **e.body}, e.status, headers)

    return Handler
