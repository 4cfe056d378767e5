"""A small fake of the Hugging Face Hub HTTP API, for tests that must run offline.

It serves directories as model repos, each at one fixed commit, and speaks just
the subset of the API that huggingface_hub's `HfApi.model_info` and
`snapshot_download` use:

    GET  /api/models/{repo}[/revision/{rev}]           repo info (id, sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]        file listing (recursive or not)
    HEAD /{repo}/resolve/{rev}/{file}                  file metadata (X-Repo-Commit, ETag, size)
    GET  /{repo}/resolve/{rev}/{file}                  file content (honours `Range: bytes=N-`)

Errors carry the `X-Error-Code` header (RepoNotFound, RevisionNotFound,
EntryNotFound) that huggingface_hub maps to its exception classes. Every request
is recorded in `FakeHub.requests` so tests can check what was (not) fetched.
"""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")


class FakeHub:
    """`with FakeHub({"org/tiny": Path(...)}) as hub:` serves on hub.endpoint."""

    def __init__(self, repos: dict[str, Path], commit: str = COMMIT, refs=("main",)):
        self.repos = {repo: Path(d) for repo, d in repos.items()}
        self.commit = commit
        self.refs = set(refs)
        self.requests: list[dict] = []  # {"method", "path", "authorization"}
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

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def resolve(self, rev: str) -> str | None:
        return self.commit if rev == self.commit or rev in self.refs else None

    def tree_entry(self, repo: str, name: str) -> dict:
        data = (self.repos[repo] / name).read_bytes()
        entry = {"type": "file", "path": name, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._dispatch(head=True)

        def do_GET(self):
            self._dispatch(head=False)

        def _dispatch(self, head: bool):
            url = urlsplit(self.path)
            hub.requests.append({"method": self.command, "path": unquote(url.path),
                                 "authorization": self.headers.get("Authorization")})
            # Match on the quoted path: a revision like refs/pr/1 arrives as refs%2Fpr%2F1.
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", url.path):
                return self._repo_info(unquote(m[1]), unquote(m[2] or "main"))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", url.path):
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                return self._tree(unquote(m[1]), unquote(m[2]), unquote(m[3] or ""), recursive)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path):
                return self._resolve(unquote(m[1]), unquote(m[2]), unquote(m[3]), head)
            self._error(404, "EntryNotFound", "Not found")

        def _check(self, repo: str, rev: str) -> str | None:
            if repo not in hub.repos:
                # The real Hub answers 401 for unknown repos when unauthenticated; 404 is simpler here.
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if (sha := hub.resolve(rev)) is None:
                self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return sha

        def _repo_info(self, repo: str, rev: str):
            if sha := self._check(repo, rev):
                self._json({"id": repo, "modelId": repo, "sha": sha, "private": False,
                            "siblings": [{"rfilename": f} for f in hub.files(repo)]})

        def _tree(self, repo: str, rev: str, prefix: str, recursive: bool):
            if not self._check(repo, rev):
                return
            prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
            entries, folders = [], set()
            for name in hub.files(repo):
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                if recursive or "/" not in rest:
                    entries.append(hub.tree_entry(repo, name))
                if "/" in rest:
                    parts = rest.split("/")[:-1]
                    depth = len(parts) if recursive else 1
                    folders.update(prefix + "/".join(parts[:i + 1]) for i in range(depth))
            entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
            self._json(entries)

        def _resolve(self, repo: str, rev: str, name: str, head: bool):
            if not (sha := self._check(repo, rev)):
                return
            file = hub.repos[repo] / name
            if name not in hub.files(repo):
                self._error(404, "EntryNotFound", "Entry not found", commit=sha)
                return
            data = file.read_bytes()
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
            if not head:
                self.wfile.write(data[start:])

        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, commit: str | None = None):
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
