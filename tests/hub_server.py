"""A local HTTP server that speaks the part of the Hugging Face Hub API huggingface_hub uses to
download a repo and to push a folder: repo info and tree, file resolve, whoami, repo and branch
creation, YAML validation, pre-upload, the LFS batch API with basic uploads, and commits.

The real client is pointed at it with HF_ENDPOINT. Uploads go through LFS: the tests set
HF_HUB_DISABLE_XET=1, because Xet storage is a separate service this server does not imitate.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

TOKENS = {"hf_write": ("me", "write"), "hf_read": ("me", "read")}
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf")


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)
    prs: int = 0

    def commit(self, files: dict[str, bytes], branch: str, message: str) -> str:
        sha = hashlib.sha1(json.dumps([branch, message, len(self.commits), sorted(files)]).encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.messages[sha] = message
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        return None


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.unknown: list[str] = []  # requests no route answered
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(
        self,
        repo_id: str,
        folder: Path | None = None,
        files: dict[str, bytes] | None = None,
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """A repo holding the files of ``folder`` (top level) and ``files``; returns its commit."""
        content = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder else {}
        content.update(files or {})
        repo = Repo(owner=repo_id.split("/")[0], private=private, gated=gated)
        self.repos[repo_id] = repo
        return repo.commit(content, "main", "initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def downloaded(self, repo_id: str) -> set[str]:
        prefix = f"/{repo_id}/resolve/"
        return {unquote(p[len(prefix) :]).split("/", 1)[1] for m, p in self.log if m == "GET" and p.startswith(prefix)}


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # ---- helpers
        def _user(self) -> tuple[str, str] | None:
            auth = self.headers.get("Authorization", "")
            return TOKENS.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

        def _send(self, status: int, body=b"", headers: dict | None = None, head: bool = False):
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str | None = None, message: str = "error", head: bool = False):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _readable(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            user = self._user()
            if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
                self._error(404 if user else 401, "RepoNotFound", "Repository not found", head)
                return None
            if repo.gated and user is None:
                self._error(401, "GatedRepo", "Access to this repo is restricted", head)
                return None
            return repo

        def _snapshot(self, repo_id: str, rev: str, head: bool = False) -> tuple[Repo, str] | None:
            """The repo and the commit ``rev`` names, or None after answering the error."""
            r = self._readable(repo_id, head)
            if r is None:
                return None
            sha = r.resolve(rev)
            if sha is None:
                self._error(404, "RevisionNotFound", "Invalid rev id", head)
                return None
            return r, sha

        def _writable(self, repo_id: str) -> bool:
            user = self._user()
            if user is None:
                self._error(401, None, "Invalid credentials in Authorization header")
                return False
            if user[1] != "write" or repo_id.split("/")[0] != user[0]:
                self._error(403, None, "You don't have the rights to create or write to this repo")
                return False
            return True

        # ---- routes
        def do_HEAD(self):
            self._route("HEAD")

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        def _route(self, method: str):
            url = urlsplit(self.path)
            path = url.path
            hub.log.append((method, path))
            query = parse_qs(url.query)
            routes = [
                ("GET", r"/api/whoami-v2", self.whoami),
                ("GET", r"/api/agent-harnesses", self.harnesses),
                ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", self.info),
                ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self.info),
                ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", self.tree),
                ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
                ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve),
                ("POST", r"/api/repos/create", self.create),
                ("POST", r"/api/validate-yaml", self.validate_yaml),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)", self.branch),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self.preupload),
                ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
                ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload),
                ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self.commit),
            ]
            for m, pattern, fn in routes:
                match = re.fullmatch(pattern, path)
                if m == method and match:
                    args = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                    return fn(query=query, **args)
            hub.unknown.append(f"{method} {self.path}")
            self._error(404, None, f"no route for {method} {path}", method == "HEAD")

        def harnesses(self, query):  # the client's agent registry: nothing to detect here
            self._send(200, {"standardEnvVars": [], "harnesses": {}})

        def whoami(self, query):
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            self._send(
                200,
                {
                    "type": "user",
                    "name": user[0],
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user[1]}},
                },
            )

        def info(self, query, repo, rev="main"):
            if (found := self._snapshot(repo, rev)) is None:
                return
            r, sha = found
            files = r.commits[sha]
            self._send(
                200,
                {
                    "_id": repo,
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": r.private,
                    "gated": "auto" if r.gated else False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "lastModified": "2026-11-22T00:00:00.000Z",
                    "createdAt": "2026-11-22T00:00:00.000Z",
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                },
            )

        def tree(self, query, repo, rev, sub=None):
            if (found := self._snapshot(repo, rev)) is None:
                return
            r, sha = found
            prefix = (sub or "").strip("/")
            entries = []
            for p, data in sorted(r.commits[sha].items()):
                if prefix and not p.startswith(prefix + "/"):
                    continue
                entry = {"type": "file", "oid": _git_sha1(data), "size": len(data), "path": p}
                if p.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            self._send(200, entries)

        def resolve(self, query, repo, rev, file):
            head = self.command == "HEAD"
            if (found := self._snapshot(repo, rev, head)) is None:
                return
            r, sha = found
            data = r.commits[sha].get(file)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_sha1(data)}"', "Accept-Ranges": "bytes"}
            if file.endswith(LFS_SUFFIXES):
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = len(data)
            self._send(200, data, headers, head)

        def create(self, query):
            payload = json.loads(self._body() or b"{}")
            name, org = payload.get("name"), payload.get("organization")
            repo_id = f"{org}/{name}" if org else f"{(self._user() or ('', ''))[0]}/{name}"
            if not self._writable(repo_id):
                return
            if repo_id in hub.repos:
                return self._send(
                    409,
                    {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"},
                    {"X-Error-Message": "You already created this model repo"},
                )
            hub.repos[repo_id] = Repo(
                owner=repo_id.split("/")[0],
                private=payload.get("visibility") == "private" or bool(payload.get("private")),
            )
            hub.repos[repo_id].commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "main", "initial commit")
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def validate_yaml(self, query):
            self._body()
            self._send(200, {"errors": [], "warnings": []})

        def branch(self, query, repo, branch):
            self._body()
            if not self._writable(repo):
                return
            r = hub.repos.get(repo)
            if r is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if branch in r.branches:
                return self._error(409, None, "Reference already exists")
            r.branches[branch] = r.branches["main"]
            self._send(200, {})

        def preupload(self, query, repo, rev):
            payload = json.loads(self._body())
            if not self._writable(repo):
                return
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for f in payload["files"]
            ]
            self._send(200, {"files": files, "commitOid": hub.repos[repo].resolve(unquote(rev))})

        def lfs_batch(self, query, repo):
            payload = json.loads(self._body())
            if not self._writable(repo):
                return
            objects = []
            for o in payload["objects"]:
                obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in hub.lfs:
                    obj["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{o['oid']}", "header": {}}}
                objects.append(obj)
            self._send(
                200,
                {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                {"Content-Type": "application/vnd.git-lfs+json"},
            )

        def lfs_upload(self, query, oid):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 mismatch")
            hub.lfs[oid] = data
            self._send(200, b"")

        def commit(self, query, repo, rev):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self._writable(repo):
                return
            r = hub.repos.get(repo)
            if r is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            create_pr = query.get("create_pr") == ["1"]
            base = r.resolve("main" if create_pr else rev)
            if base is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            files = dict(r.commits[base])
            header = {}
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(400, None, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif key in ("deletedFile", "deletedFolder"):
                    files.pop(value["path"], None)
            branch = rev
            if create_pr:
                r.prs += 1
                branch = f"refs/pr/{r.prs}"
            sha = r.commit(files, branch, header.get("summary", ""))
            answer = {"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha, "success": True}
            if create_pr:
                answer["pullRequestUrl"] = f"{hub.endpoint}/{repo}/discussions/{r.prs}"
            self._send(200, answer)

    return Handler
