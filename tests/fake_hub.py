"""An in-process fake of the Hugging Face Hub's HTTP API, for the real ``huggingface_hub`` client.

Install it with :meth:`FakeHub.install` (``huggingface_hub.set_client_factory`` with an
``httpx2.MockTransport``; Xet disabled, so uploads take the LFS "basic" path). It keeps dataset
and model repos (two namespaces, as on the Hub: ``/datasets/org/name`` and ``/org/name``) as
commits of files, with branches, pull-request refs, tags and an LFS object store, and
answers the endpoints the client uses to create a repo, open/list/merge pull requests, preupload,
upload LFS objects, commit, list trees and refs, tag, validate a card's YAML, and serve files
(``resolve``, ``paths-info``, repo info) so that ``snapshot_download`` and ``datasets`` can read a
published revision back.

Failures are injected with :meth:`FakeHub.fail` (status, optional headers, how many times), and
every request is logged in :attr:`FakeHub.log`. Only the behaviour the publisher and the
consumer path rely on is modelled (no git packs, no Xet, no pagination).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

import httpx2
import yaml

GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
MODEL_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = (".parquet", ".safetensors")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    spec = "version https://git-lfs.github.com/spec/v1"
    return f"{spec}\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """A file in a commit: regular (content inline) or LFS (sha256 into the object store)."""

    size: int
    content: bytes | None = None
    sha256: str | None = None

    @property
    def oid(self) -> str:
        if self.sha256 is None:
            return git_sha1(self.content)
        return git_sha1(lfs_pointer(self.sha256, self.size))


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, dict] = field(default_factory=dict)
    repo_type: str = "dataset"

    @property
    def url_prefix(self) -> str:
        return "datasets/" if self.repo_type == "dataset" else ""


@dataclass
class Failure:
    method: str
    pattern: re.Pattern
    status: int
    times: int
    headers: dict[str, str]
    after: int = 0
    performed: bool = False


class FakeHub:
    """The fake Hub. ``tokens``: the bearer tokens it accepts (write access everywhere)."""

    def __init__(self, endpoint: str, tokens: set[str]):
        self.endpoint = endpoint.rstrip("/")
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}  # dataset repos
        self.models: dict[str, Repo] = {}  # model repos
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str, int]] = []
        self.failures: list[Failure] = []
        self._lock = threading.RLock()
        self._counter = 0

    # test controls --------------------------------------------------------------------------

    def fail(
        self,
        method: str,
        pattern: str,
        status: int,
        times: int = 1,
        headers: dict[str, str] | None = None,
        after: int = 0,
        performed: bool = False,
    ) -> None:
        """Let ``after`` requests matching (method, path regex) through, then answer the next
        ``times`` ones with ``status`` (and ``headers``). With ``performed`` those requests take
        effect first and only their answer is lost (a gateway timeout after the server acted).
        """
        rule = Failure(method, re.compile(pattern), status, times, headers or {}, after, performed)
        self.failures.append(rule)

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, int]]:
        rx = re.compile(pattern)
        return [c for c in self.log if c[0] == method and rx.search(c[1])]

    def store(self, repo_type: str) -> dict[str, Repo]:
        """The repos of one type ("dataset" or "model")."""
        return self.repos if repo_type == "dataset" else self.models

    def files(self, repo_id: str, revision: str, repo_type: str = "dataset") -> dict[str, bytes]:
        """path → bytes of every file at ``revision``."""
        repo = self.store(repo_type)[repo_id]
        sha = self._resolve(repo, revision)
        return {p: self._bytes(e) for p, e in repo.commits[sha].items()}

    def install(self, monkeypatch) -> None:
        """Route every huggingface_hub request (and only those) to this fake."""
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import _http

        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )

        def factory() -> httpx2.Client:
            return httpx2.Client(
                transport=httpx2.MockTransport(self.handle),
                event_hooks={"request": [_http.hf_request_event_hook]},
                follow_redirects=True,
            )

        huggingface_hub.set_client_factory(factory)
        monkeypatch.setattr(huggingface_hub, "_fake_hub_installed", True, raising=False)

    @staticmethod
    def uninstall() -> None:
        import huggingface_hub
        from huggingface_hub.utils import _http

        huggingface_hub.set_client_factory(_http.default_client_factory)

    # plumbing -------------------------------------------------------------------------------

    def _new_sha(self, *parts: object) -> str:
        self._counter += 1
        return hashlib.sha1(repr((self._counter, *parts)).encode()).hexdigest()

    def _bytes(self, e: Entry) -> bytes:
        return e.content if e.sha256 is None else self.lfs[e.sha256]

    def _resolve(self, repo: Repo, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.branches[revision[11:]]
        m = re.fullmatch(r"refs/pr/([0-9]+)", revision)
        if m and int(m.group(1)) in repo.prs:
            return repo.prs[int(m.group(1))]["head"]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        return None

    def _commit(self, repo: Repo, files: dict[str, Entry], message: str) -> str:
        sha = self._new_sha(repo.repo_id, message, sorted(files))
        repo.commits[sha] = dict(files)
        return sha

    def _set_ref(self, repo: Repo, revision: str, sha: str) -> None:
        revision = unquote(revision)
        m = re.fullmatch(r"refs/pr/([0-9]+)", revision)
        if m:
            repo.prs[int(m.group(1))]["head"] = sha
        else:
            repo.branches[revision.removeprefix("refs/heads/")] = sha

    @staticmethod
    def _json(status: int, body, headers: dict[str, str] | None = None) -> httpx2.Response:
        return httpx2.Response(status, json=body, headers=headers or {})

    def _error(self, status: int, message: str, code: str | None = None) -> httpx2.Response:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return self._json(status, {"error": message}, headers)

    # the transport --------------------------------------------------------------------------

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        raw = request.url.raw_path.decode().split("?", 1)[0]
        path = unquote(raw)
        with self._lock:
            response = self._handle(request, raw, path)
            self.log.append((request.method, path, response.status_code))
        return response

    def _handle(self, request: httpx2.Request, raw: str, path: str) -> httpx2.Response:
        for f in self.failures:
            if f.times > 0 and f.method == request.method and f.pattern.search(path):
                if f.after > 0:
                    f.after -= 1
                    continue
                f.times -= 1
                if f.performed:
                    self._serve(request, raw, path)
                return httpx2.Response(
                    f.status, json={"error": f"injected {f.status}"}, headers=f.headers
                )
        return self._serve(request, raw, path)

    def _serve(self, request: httpx2.Request, raw: str, path: str) -> httpx2.Response:
        if not raw.startswith("/lfs-upload/"):  # presigned storage URLs carry no token
            auth = request.headers.get("authorization", "")
            if auth.removeprefix("Bearer ") not in self.tokens:
                return self._error(401, "Invalid credentials in Authorization header")
        seg = [unquote(s) for s in raw.strip("/").split("/")]
        method = request.method
        try:
            if seg[:3] == ["api", "repos", "create"] and method == "POST":
                return self._create_repo(json.loads(request.content))
            if seg[:2] == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(request.content))
            if seg[0] == "lfs-upload" and method == "PUT":
                return self._lfs_put(seg[1], request.read())
            kind = "model"  # /api/models/org/name/…, /org/name/resolve/…, /org/name.git/…
            if seg[:2] == ["api", "datasets"]:
                kind, seg = "dataset", ["api", *seg[2:]]
            elif seg[:2] == ["api", "models"]:
                seg = ["api", *seg[2:]]
            elif seg[:1] == ["api"]:
                seg = []  # no other /api route
            elif seg[:1] == ["datasets"]:
                kind, seg = "dataset", seg[1:]
            if len(seg) >= 2 and seg[0] != "api" and seg[1].endswith(".git"):
                repo_id = f"{seg[0]}/{seg[1][:-4]}"
                return self._lfs_batch(kind, repo_id, json.loads(request.content))
            if len(seg) >= 4 and seg[0] != "api" and seg[2] == "resolve":
                return self._resolve_file(request, kind, f"{seg[0]}/{seg[1]}", seg[3], seg[4:])
            if len(seg) >= 3 and seg[0] == "api":
                return self._api(request, kind, f"{seg[1]}/{seg[2]}", seg[3:])
        except KeyError as e:
            return self._error(404, f"not found: {e}", "EntryNotFound")
        return self._error(404, f"fake hub has no route for {method} {path}")

    def _api(
        self, request: httpx2.Request, kind: str, repo_id: str, rest: list[str]
    ) -> httpx2.Response:
        repos = self.store(kind)
        if repo_id not in repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        repo = repos[repo_id]
        method = request.method
        query = parse_qs(request.url.query.decode())
        what = rest[0] if rest else ""
        body = None
        if request.content and what in ("preupload", "tag", "discussions"):
            body = json.loads(request.content)
        if what in ("", "revision") and method == "GET":
            return self._repo_info(repo, rest[1] if len(rest) > 1 else "main")
        if what == "refs" and method == "GET":
            return self._refs(repo, "include_prs" in query)
        if what == "tree" and method == "GET":
            return self._tree(repo, rest[1], "/".join(rest[2:]), query)
        if what == "paths-info" and method == "POST":
            return self._paths_info(repo, rest[1], request)
        if what == "preupload" and method == "POST":
            return self._preupload(repo, rest[1], body)
        if what == "commit" and method == "POST":
            return self._commit_endpoint(repo, rest[1], request.content)
        if what == "tag" and method == "POST":
            return self._tag(repo, rest[1], body)
        if what == "discussions":
            return self._discussions(repo, method, rest[1:], body, query)
        route = f"/api/{kind}s/{repo_id}/{what}"
        return self._error(404, f"fake hub has no route for {method} {route}")

    # endpoints ------------------------------------------------------------------------------

    def _create_repo(self, body: dict) -> httpx2.Response:
        repo_id = f"{body['organization']}/{body['name']}"
        kind = body.get("type") or "model"  # the client sends no type for a model repo
        if kind not in ("dataset", "model"):
            return self._error(400, f"this fake hub hosts dataset and model repos, not {kind}")
        repos = self.store(kind)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(repo_id, private, repo_type=kind)
        url = f"{self.endpoint}/{repo.url_prefix}{repo_id}"
        if repo_id in repos:  # the real Hub's 409 carries the url too
            return self._json(409, {"error": f"You already created this {kind} repo", "url": url})
        attributes = GITATTRIBUTES if kind == "dataset" else MODEL_GITATTRIBUTES
        files = {".gitattributes": Entry(len(attributes), attributes)}
        repo.branches["main"] = self._commit(repo, files, "initial commit")
        repos[repo_id] = repo
        return self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, body: dict) -> httpx2.Response:
        content = body.get("content", "")
        m = re.match(r"\A---\n(.*?\n)---\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": str(e)}], "warnings": []})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata is not a mapping"}]})
        return self._json(200, {"errors": [], "warnings": []})

    def _repo_info(self, repo: Repo, revision: str) -> httpx2.Response:
        sha = self._resolve(repo, revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[sha]
        return self._json(
            200,
            {
                "id": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(files)],
                "lastModified": "2026-01-01T00:00:00.000Z",
            },
        )

    def _refs(self, repo: Repo, include_prs: bool) -> httpx2.Response:
        def ref(name: str, full: str, sha: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": sha}

        body = {
            "branches": [ref(b, f"refs/heads/{b}", s) for b, s in sorted(repo.branches.items())],
            "converts": [],
            "tags": [ref(t, f"refs/tags/{t}", s) for t, s in sorted(repo.tags.items())],
        }
        body["pullRequests"] = [
            ref(f"refs/pr/{n}", f"refs/pr/{n}", pr["head"])
            for n, pr in sorted(repo.prs.items())
            if include_prs and pr["status"] == "open"
        ]
        return self._json(200, body)

    def _entry_json(self, path: str, e: Entry) -> dict:
        d = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.sha256 is not None:
            d["lfs"] = {
                "oid": e.sha256,
                "size": e.size,
                "pointerSize": len(lfs_pointer(e.sha256, e.size)),
            }
        return d

    def _tree(self, repo: Repo, revision: str, prefix: str, query: dict) -> httpx2.Response:
        sha = self._resolve(repo, revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[sha]
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        base = prefix.strip("/")
        out, folders = [], set()
        for p in sorted(files):
            if base and not p.startswith(base + "/"):
                continue
            rel = p[len(base) + 1 :] if base else p
            parts = rel.split("/")
            for k in range(1, len(parts)):
                folder = "/".join(([base] if base else []) + parts[:k])
                if recursive or k == 1:
                    folders.add(folder)
            if recursive or len(parts) == 1:
                out.append(self._entry_json(p, files[p]))
        dirs = [{"type": "directory", "oid": "0" * 40, "path": d} for d in sorted(folders)]
        if base and not out and not dirs:
            return self._error(404, f"{base} does not exist", "EntryNotFound")
        return self._json(200, dirs + out)

    def _paths_info(self, repo: Repo, revision: str, request: httpx2.Request) -> httpx2.Response:
        sha = self._resolve(repo, revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        form = parse_qs(request.content.decode())
        if request.headers.get("content-type", "").startswith("application/json"):
            paths = json.loads(request.content).get("paths", [])
        else:
            paths = form.get("paths", [])
        files = repo.commits[sha]
        out = []
        for p in paths:
            p = p.strip("/")
            if p in files:
                out.append(self._entry_json(p, files[p]))
            elif any(f.startswith(p + "/") for f in files) or p == "":
                out.append({"type": "directory", "oid": "0" * 40, "path": p})
        return self._json(200, out)

    def _preupload(self, repo: Repo, revision: str, body: dict) -> httpx2.Response:
        sha = self._resolve(repo, revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = repo.commits[sha]
        out = []
        for f in body["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20
            existing = files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.sha256 is not None else existing.oid
            out.append(
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self._json(200, {"files": out, "commitOid": sha})

    def _lfs_batch(self, kind: str, repo_id: str, body: dict) -> httpx2.Response:
        if repo_id not in self.store(kind):
            return self._error(404, "Repository not found", "RepoNotFound")
        objects = []
        for obj in body["objects"]:
            d = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                d["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(d)
        return self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, data: bytes) -> httpx2.Response:
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded bytes do not match the LFS oid")
        self.lfs[oid] = data
        return httpx2.Response(200)

    def _commit_endpoint(self, repo: Repo, revision: str, content: bytes) -> httpx2.Response:
        head = self._resolve(repo, revision)
        if head is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[head])
        summary = ""
        for line in content.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != head:
                    return self._error(412, "A commit has happened since. Please refresh")
            elif key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Entry(len(data), data)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = Entry(value["size"], None, value["oid"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                for p in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                    del files[p]
        sha = self._commit(repo, files, summary)
        self._set_ref(repo, revision, sha)
        return self._json(
            200,
            {
                "commitUrl": f"{self.endpoint}/{repo.url_prefix}{repo.repo_id}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            },
        )

    def _tag(self, repo: Repo, revision: str, body: dict) -> httpx2.Response:
        sha = self._resolve(repo, revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if body["tag"] in repo.tags:
            return self._error(409, f"Tag {body['tag']} already exists")
        repo.tags[body["tag"]] = sha
        return self._json(200, {})

    def _discussion_json(self, repo: Repo, num: int) -> dict:
        pr = repo.prs[num]
        return {
            "title": pr["title"],
            "num": num,
            "author": {"name": "tester"},
            "createdAt": "2026-01-01T00:00:00.000Z",
            "status": pr["status"],
            "repo": {"name": repo.repo_id, "type": repo.repo_type},
            "isPullRequest": True,
        }

    def _discussions(
        self, repo: Repo, method: str, rest: list[str], body, query: dict
    ) -> httpx2.Response:
        if not rest and method == "POST":
            if not body.get("pullRequest"):
                return self._error(400, "this fake hub only opens pull requests")
            num = max([*repo.prs, 0]) + 1
            base = repo.branches["main"]
            repo.prs[num] = {"title": body["title"], "status": "open", "base": base, "head": base}
            return self._json(200, {"num": num, "pullRequest": True})
        if not rest and method == "GET":
            status = query.get("status", [None])[0]
            items = [
                self._discussion_json(repo, n)
                for n in sorted(repo.prs, reverse=True)
                if status in (None, "all") or repo.prs[n]["status"] == status
            ]
            return self._json(200, {"discussions": items, "count": len(items), "start": 0})
        num = int(rest[0])
        if num not in repo.prs:
            return self._error(404, "Discussion not found")
        if len(rest) == 1 and method == "GET":
            d = self._discussion_json(repo, num)
            d.update(
                events=[],
                changes={"base": "refs/heads/main"},
                filesWithConflicts=[],
                diff="",
            )
            return self._json(200, d)
        if rest[1:] == ["merge"] and method == "POST":
            pr = repo.prs[num]
            if pr["status"] != "open":
                return self._error(400, f"pull request #{num} is {pr['status']}")
            base, head = repo.commits[pr["base"]], repo.commits[pr["head"]]
            files = dict(repo.commits[repo.branches["main"]])
            for p in set(base) | set(head):
                if base.get(p) != head.get(p):
                    if p in head:
                        files[p] = head[p]
                    else:
                        files.pop(p, None)
            repo.branches["main"] = self._commit(repo, files, f"Merge #{num}")
            pr["status"] = "merged"
            return self._json(200, {})
        return self._error(404, "no such discussion route")

    def _resolve_file(
        self, request: httpx2.Request, kind: str, repo_id: str, revision: str, parts: list[str]
    ) -> httpx2.Response:
        repos = self.store(kind)
        if repo_id not in repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        repo = repos[repo_id]
        sha = self._resolve(repo, revision)
        if sha is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        path = "/".join(parts)
        entry = repo.commits[sha].get(path)
        if entry is None:
            return self._error(404, f"{path} not found", "EntryNotFound")
        data = self._bytes(entry)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{entry.sha256 or entry.oid}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if entry.sha256 is not None:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        rng = request.headers.get("range")
        status = 200
        if rng:
            m = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)", rng.strip())
            if m:
                start = int(m.group(1)) if m.group(1) else max(0, len(data) - int(m.group(2)))
                end = int(m.group(2)) if m.group(1) and m.group(2) else len(data) - 1
                end = min(end, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start : end + 1]
                headers["Content-Length"] = str(len(data))
                status = 206
        if request.method == "HEAD":
            return httpx2.Response(status, headers=headers)
        return httpx2.Response(status, content=data, headers=headers)
