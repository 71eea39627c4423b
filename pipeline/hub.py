"""Publish a dataset or a checkpoint folder to the Hugging Face Hub: pull request → merge → tag
``vN``.

Consumers pin ``revision="vN"``, so a published version must be immutable and ``main`` must
never show a half-uploaded dataset or model. :func:`publish` therefore

1. refuses a malformed repo id, a missing token, and a folder that fails ``verify`` (a
   dataset) or does not load with ``load_checkpoint`` (a checkpoint);
2. creates the dataset or model repo if needed (``private`` on creation);
3. stops early if a ``vN`` tag already holds exactly this content ("already published");
4. opens a pull request (or reuses the open one of an interrupted run of the same content,
   recognised by the content id in its title) and uploads to its ref ``refs/pr/N`` only the
   files that are not there yet with the same sha256 — in several commits, the bulk first
   (shards, ``*.safetensors``) and the rest (``manifest.json`` or ``config.json``, the
   tokenizer, ``README.md``) last, so a rerun resumes where the last run stopped;
5. checks that the PR now holds exactly the folder, then merges it;
6. tags the merged commit ``vN`` (the next free integer, or the one asked for; a tag that
   exists with other content is refused, tags are never moved or deleted).

A dataset's content is ``manifest.json`` and the shards; a checkpoint's is every file of its
folder (config.json, model.safetensors, tokenizer.json, data files). The card (``README.md``:
the dataset card, or the model card of :func:`tsdfm.pipeline.card.render_model_card`) is
regenerated for the upload with the repo id and version in its snippets, so it is not part of
the identity. Both kinds go through one flow (:func:`publish_content`) fed a :class:`Content`.

Every Hub call goes through one retry helper (:meth:`Hub.call`): 429 and 5xx back off
exponentially (honouring ``Retry-After``) up to a cap, 412 (a concurrent commit moved the
branch) retries, network errors retry, and 401/403/404 fail at once with a message saying
what to fix. The token comes from the argument, ``HF_TOKEN`` or the HF login; it is held in
memory only, never printed, logged or written (error messages are scrubbed of it).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsdfm.models.errors import TsdfmError
from tsdfm.models.hashing import canonical_json
from tsdfm.models.refs import is_repo_id
from tsdfm.pipeline.card import CARD_FILE
from tsdfm.pipeline.manifest import MANIFEST_FILE, Manifest, without_timings
from tsdfm.pipeline.shards import DATA_DIR, shard_name

REPO_TYPE = "dataset"
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_CHUNK = 2**20


class HubError(TsdfmError):
    """Publishing failed; the message says what to fix. ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# inputs --------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as ``models.refs.is_repo_id`` (huggingface_hub) reads it, else HubError."""
    if not is_repo_id(repo_id):
        raise HubError(
            f"repo id {repo_id!r} is malformed: use org/name (letters, digits, '-', '_', '.'; "
            "no '--' or '..'; at most 96 characters), e.g. my-org/tsdfm-shaped-k8"
        )
    return repo_id


def resolve_token(token: str | None, repo_id: str) -> str:
    """The token to publish with: the argument, else HF_TOKEN, else the HF login."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        org = repo_id.split("/")[0]
        raise HubError(
            f"no Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that may "
            f"write to '{org}'"
        )
    return found


def parse_version(tag: str) -> int | None:
    m = _VERSION.match(tag)
    return int(m.group(1)) if m else None


# the retry helper ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How :meth:`Hub.call` waits: delay_n = min(cap, Retry-After or base · 2^(n−1)).

    Args:
        attempts: tries in all (the first call included).
        base_delay: seconds before the first retry without Retry-After.
        max_delay: cap on any single wait (Retry-After included).
        conflict_delay: seconds before retrying a 412 (concurrent commit).
    """

    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 60.0
    conflict_delay: float = 1.0

    def delay(self, attempt: int, status: int | None, retry_after: float | None) -> float:
        if status == 412:
            return min(self.max_delay, self.conflict_delay)
        if retry_after is not None:
            return min(self.max_delay, max(0.0, retry_after))
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1))


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _response(exc: BaseException):
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if response is not None and hasattr(response, "status_code"):
            return response
    return None


OFFLINE = (
    "HF_HUB_OFFLINE is set, so huggingface_hub makes no requests; publishing needs the Hub: "
    "unset HF_HUB_OFFLINE (or set it to 0) and rerun"
)


def _is_offline(exc: BaseException) -> bool:
    """huggingface_hub refused to make a request (HF_HUB_OFFLINE): not a network outage."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    return any(isinstance(e, OfflineModeIsEnabled) for e in _chain(exc))


def _is_network_error(exc: BaseException) -> bool:
    import httpx2  # huggingface_hub 2.x's HTTP client

    kinds = (httpx2.TransportError, ConnectionError, TimeoutError)
    return any(isinstance(e, kinds) for e in _chain(exc))


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: an integer, or an HTTP date (seconds from now)."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(exc: BaseException, response) -> str:
    for e in _chain(exc):
        msg = getattr(e, "server_message", None)
        if msg:
            return " ".join(str(msg).split())[:200]
    try:
        return " ".join(response.text.split())[:200]
    except Exception:
        return ""


class Hub:
    """One repo on the Hub (a dataset or a model repo), every call through :meth:`call`.

    Args:
        repo_id: org/name.
        token: write token (kept in memory only).
        policy: retry waits.
        sleep: the wait function (tests pass a recorder).
        log: progress lines (never contain the token).
        repo_type: "dataset" or "model".
    """

    def __init__(
        self,
        repo_id: str,
        token: str,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] | None = None,
        log: Callable[[str], None] | None = None,
        repo_type: str = REPO_TYPE,
    ):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.repo_type = repo_type
        self.api = HfApi(token=token)
        self._token = token
        self.policy = policy if policy is not None else RetryPolicy()
        self.sleep = sleep if sleep is not None else _sleep
        self.log = log if log is not None else (lambda line: None)

    def scrub(self, text: str) -> str:
        """``text`` with the token replaced (defence in depth for server echoes)."""
        return text.replace(self._token, "hf_***") if self._token else text

    def _fatal(self, status: int, what: str, detail: str) -> HubError:
        org = self.repo_id.split("/")[0]
        hint = {
            401: "the Hub rejected the token: set HF_TOKEN to a valid token or run `hf auth login`",
            403: f"the token may not do this on {self.repo_id}: use a token with write access "
            f"to '{org}' (a fine-grained token needs write permission on that namespace or repo)",
            404: f"{self.repo_id} (or the revision) was not found: check the repo id, that it is "
            f"a {self.repo_type} repo, and that the token can see it (private repos need a token "
            "of a member)",
        }[status]
        extra = f" [{detail}]" if detail else ""
        return HubError(self.scrub(f"{what}: HTTP {status}: {hint}{extra}"), status)

    def call(
        self,
        what: str,
        fn: Callable[..., Any],
        *args: Any,
        settled: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(*args, **kwargs)`` with retries: 429/5xx/412/network retried, 4xx fatal.

        ``settled`` makes a call that is not idempotent (open a PR, merge it) safe to retry: a
        failed attempt may still have taken effect on the Hub (the answer was lost), so before
        every retry ``settled()`` looks at the Hub's state, and its result, when not None, is
        returned instead of calling ``fn`` again.
        """
        from huggingface_hub.errors import HfHubHTTPError

        attempt = 0
        while True:
            attempt += 1
            try:
                if attempt > 1 and settled is not None:
                    done = settled()
                    if done is not None:
                        self.log(f"{what}: it took effect before the error; not repeating it")
                        return done
                return fn(*args, **kwargs)
            except Exception as e:
                if _is_offline(e):
                    raise HubError(self.scrub(f"{what}: {OFFLINE}")) from None
                response = _response(e)
                status = response.status_code if response is not None else None
                transient = status is not None and (status in (412, 429) or status >= 500)
                if status is None and _is_network_error(e):
                    transient = True
                detail = _server_message(e, response) if response is not None else ""
                if status in (401, 403, 404):
                    raise self._fatal(status, what, detail) from None
                if not transient:
                    if status is not None or isinstance(e, HfHubHTTPError):
                        raise HubError(
                            self.scrub(f"{what}: the Hub refused it (HTTP {status}: {detail})"),
                            status,
                        ) from None
                    raise
                if attempt >= self.policy.attempts:
                    cause = f"HTTP {status}" if status is not None else type(e).__name__
                    raise HubError(
                        self.scrub(
                            f"{what}: the Hub still fails after {attempt} attempts ({cause}); "
                            "rerun the same command later to resume"
                        ),
                        status,
                    ) from None
                header = response.headers.get("Retry-After") if response is not None else None
                wait = self.policy.delay(attempt, status, retry_after_seconds(header))
                cause = f"HTTP {status}" if status is not None else type(e).__name__
                left = self.policy.attempts - 1
                self.log(f"{what}: {cause}; retry {attempt}/{left} in {wait:g}s")
                self.sleep(wait)

    # small wrappers ---------------------------------------------------------------------------

    def tree(self, revision: str) -> dict[str, Any]:
        """path → RepoFile of every file at ``revision``."""
        entries = self.call(
            f"listing files at {revision}",
            lambda: list(
                self.api.list_repo_tree(
                    self.repo_id, recursive=True, revision=revision, repo_type=self.repo_type
                )
            ),
        )
        return {e.path: e for e in entries if hasattr(e, "size")}

    def read(self, path: str, revision: str) -> bytes:
        """The bytes of ``path`` at ``revision`` (a small file, e.g. manifest.json)."""
        import tempfile

        def fetch() -> bytes:
            with tempfile.TemporaryDirectory(prefix="tsdfm-hub-") as tmp:
                local = self.api.hf_hub_download(
                    self.repo_id, path, revision=revision, repo_type=self.repo_type, cache_dir=tmp
                )
                return Path(local).read_bytes()

        return self.call(f"reading {path} at {revision}", fetch)

    def holds(self, files: list[LocalFile], revision: str) -> bool:
        """``revision`` holds exactly this content (see :func:`same_content`)."""
        return same_content(files, self.tree(revision), lambda p: self.read(p, revision))

    def refs(self):
        return self.call(
            "listing branches, tags and pull requests",
            self.api.list_repo_refs,
            self.repo_id,
            repo_type=self.repo_type,
            include_pull_requests=True,
        )


# local files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    """A file to publish: its place in the repo, size, sha256 and git blob sha1."""

    path: str
    size: int
    sha256: str
    git_sha1: str
    source: Path | None = None
    data: bytes | None = None

    @staticmethod
    def from_bytes(path: str, data: bytes) -> LocalFile:
        sha, git = _digests([data], len(data))
        return LocalFile(path, len(data), sha, git, None, data)

    @staticmethod
    def from_path(path: str, source: Path) -> LocalFile:
        size = source.stat().st_size

        def chunks():
            with open(source, "rb") as f:
                while chunk := f.read(_CHUNK):
                    yield chunk

        sha, git = _digests(chunks(), size)
        return LocalFile(path, size, sha, git, source, None)

    def matches(self, remote: Any) -> bool:
        """True iff the remote file (a RepoFile) has these bytes."""
        if remote is None or getattr(remote, "size", None) != self.size:
            return False
        lfs = getattr(remote, "lfs", None)
        if lfs is not None:
            return lfs.sha256 == self.sha256
        return remote.blob_id == self.git_sha1

    def operation(self):
        from huggingface_hub import CommitOperationAdd

        content = self.data if self.data is not None else str(self.source)
        return CommitOperationAdd(path_in_repo=self.path, path_or_fileobj=content)


def _digests(chunks, size: int) -> tuple[str, str]:
    """(sha256, git blob sha1) of the bytes in ``chunks``, in one pass."""
    sha = hashlib.sha256()
    git = hashlib.sha1(f"blob {size}\0".encode())
    for chunk in chunks:
        sha.update(chunk)
        git.update(chunk)
    return sha.hexdigest(), git.hexdigest()


def content_files(root: Path, manifest: Manifest) -> list[LocalFile]:
    """manifest.json and every planned shard: the dataset's content."""
    paths = [MANIFEST_FILE] + [shard_name(i, manifest.num_shards) for i in manifest.committed()]
    return [LocalFile.from_path(p, root / p) for p in paths]


def _digest(f: LocalFile) -> str:
    """What identifies a content file: its sha256, for manifest.json that of its content."""
    if f.path != MANIFEST_FILE:
        return f.sha256
    data = f.data if f.data is not None else f.source.read_bytes()
    return manifest_content_digest(data)


def manifest_content_digest(data: bytes) -> str:
    """sha256 of a manifest's content: the JSON without its timing counters.

    Rebuilding a dataset gives the same shards and the same manifest except the seconds each
    shard took (``*_seconds`` counters); those must not make the same data a new version.
    """
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha256(canonical_json(without_timings(d), "manifest.json")).hexdigest()


def content_id(files: list[LocalFile]) -> str:
    """sha256 over the sorted (path, content digest) of the content files."""
    blob = "".join(f"{f.path} {_digest(f)}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(blob.encode()).hexdigest()


def in_data_dir(path: str) -> bool:
    """A dataset owns the remote files under data/ (a shard not in it is stale)."""
    return path.startswith(f"{DATA_DIR}/")


def same_content(
    files: list[LocalFile],
    remote: dict[str, Any],
    fetch: Callable[[str], bytes] | None = None,
    owned: Callable[[str], bool] = in_data_dir,
) -> bool:
    """The remote tree holds exactly these content files (other paths not ``owned`` ignored).

    A remote ``manifest.json`` with other bytes still counts as the same when it differs only
    in timing counters; ``fetch(path)`` reads it (without ``fetch`` bytes must match).
    """
    for f in files:
        if f.matches(remote.get(f.path)):
            continue
        if f.path != MANIFEST_FILE or fetch is None or remote.get(f.path) is None:
            return False
        if manifest_content_digest(fetch(f.path)) != _digest(f):
            return False
    wanted = {f.path for f in files}
    return not [p for p in remote if owned(p) and p not in wanted]


# what one publication uploads ----------------------------------------------------------------

KINDS = ("dataset", "model")
#: files of a model repo that are not the checkpoint's (the Hub's, the generated card)
MODEL_REPO_FILES = (".gitattributes", CARD_FILE)


@dataclass(frozen=True)
class Content:
    """One folder to publish, as the shared PR → merge → tag flow sees it.

    Attributes:
        repo_type: "dataset" or "model".
        files: the content (its identity; the card is not part of it).
        fingerprint: the dataset's fingerprint, or the checkpoint's identity.
        what: how PR titles and tag messages name it ("dataset", "student", …).
        summary: the PR's description.
        card: (repo id, tag) → the README.md uploaded with it.
        owned: the remote paths this content owns: one that is not in ``files`` is stale
            (a same-content check fails on it, the upload deletes it).
        bulk: the paths uploaded first, in batches; the others go in the last commit.
        tolerant: compare ``manifest.json`` without its timing counters (datasets).
    """

    repo_type: str
    files: list[LocalFile]
    fingerprint: str
    what: str
    summary: str
    card: Callable[[str, str], str]
    owned: Callable[[str], bool]
    bulk: Callable[[str], bool]
    tolerant: bool = False


def dataset_content(root: Path, license: str | None) -> Content:
    """A dataset folder that passes ``verify``: manifest.json and shards; a HubError if not."""
    from tsdfm.pipeline.card import card_facts, render_card
    from tsdfm.pipeline.verify import verify_folder

    report = verify_folder(str(root))
    if not report.ok:
        first = report.problems[0]
        raise HubError(
            f"refusing to publish {root}: verify found {len(report.problems)} problem(s), e.g. "
            f"{first}; run `tsdfm-pipeline verify {root}` for all of them and fix or rebuild"
        )
    manifest = Manifest.load(str(root))
    facts = card_facts(str(root))
    totals = manifest.totals()
    return Content(
        repo_type="dataset",
        files=content_files(root, manifest),
        fingerprint=manifest.fingerprint,
        what="dataset",
        summary=f"Trajectory dataset {manifest.fingerprint}: {totals['shards']} shards, "
        f"{totals['rows']} rows, {totals['bytes']} bytes.",
        card=lambda repo_id, tag: render_card(facts, repo_id, tag, license),
        owned=in_data_dir,
        bulk=in_data_dir,
        tolerant=True,
    )


def canonical_safetensors(source: Path, dest: Path) -> Path:
    """``source`` rewritten with its JSON header in sorted key order, the tensor bytes as they
    are: the same tensors and metadata give the same file bytes.

    ``safetensors`` writes the ``__metadata__`` entries in a random order, so saving the same
    model twice gives two files with different sha256; the Hub compares files by sha256.
    Layout (the safetensors format): an 8-byte little-endian header length n, n bytes of
    JSON (padded with spaces to a multiple of 8), then the tensor data, whose offsets are
    relative to its start and so do not move.
    """
    import struct

    with open(source, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        try:
            if n < 2 or n > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise HubError(
                f"{source} is not a safetensors file (its header does not read); save the "
                "checkpoint again"
            ) from None
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            while chunk := f.read(_CHUNK * 16):
                out.write(chunk)
    return dest


def checkpoint_files(folder: Path, staging: Path) -> list[LocalFile]:
    """Every file of a checkpoint folder except its card and hidden entries (e.g. the
    ``.cache`` of a download), in path order; a HubError on a pickle. ``*.safetensors`` are
    uploaded from canonical copies in ``staging`` (:func:`canonical_safetensors`)."""
    from tsdfm.models.checkpoint import PICKLE_SUFFIXES

    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if not f.is_file() or rel == CARD_FILE or any(p.startswith(".") for p in rel.split("/")):
            continue
        if rel.endswith(PICKLE_SUFFIXES):
            raise HubError(
                f"{folder} holds the pickle {rel}; pickles are never published (loading them "
                "can run code): remove it, the weights are model.safetensors"
            )
        if rel.endswith(".safetensors"):
            f = canonical_safetensors(f, staging / rel)
        out.append(LocalFile.from_path(rel, f))
    return out


def local_paths(value: Any, where: str = "") -> list[str]:
    """The places in a JSON value that hold an absolute local path ("/…", "~…", "C:\\…")."""
    if isinstance(value, dict):
        return [p for k in sorted(value) for p in local_paths(value[k], f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in local_paths(v, f"{where}[{i}]")]
    if isinstance(value, str) and re.match(r"^(/|~|[A-Za-z]:[\\/])", value):
        return [where.lstrip(".")]
    return []


def model_content(
    folder: Path,
    eval_file: Path | None,
    license: str | None,
    staging: Path,
    say: Callable[[str], None] = lambda line: None,
) -> Content:
    """A checkpoint folder (it must load with ``load_checkpoint``) for a model repo;
    ``staging``: a scratch folder for the canonical weights (as large as they are)."""
    from tsdfm.models.checkpoint import load_checkpoint
    from tsdfm.pipeline.card import model_card_facts, render_model_card

    ckpt = load_checkpoint(folder)  # one line (CheckpointError) when it is not a checkpoint
    facts = model_card_facts(ckpt, eval_file)
    files = checkpoint_files(folder, staging)
    found = local_paths(ckpt.config.to_dict())
    if found:
        say(
            f"note: config.json records local paths ({', '.join(found[:4])}"
            f"{', …' if len(found) > 4 else ''}); they are part of the checkpoint's identity, "
            "so they are published as they are (the model card names folders only)"
        )
    role = ckpt.config.role
    return Content(
        repo_type="model",
        files=files,
        fingerprint=ckpt.identity,
        what=role,
        summary=f"tsdfm {role} checkpoint {ckpt.identity} ({facts.parameters:,} parameters).",
        card=lambda repo_id, tag: render_model_card(facts, repo_id, tag, license),
        owned=lambda p: p not in MODEL_REPO_FILES,
        bulk=lambda p: p.endswith(".safetensors"),
    )


def locate(root: Path, kind: str | None) -> tuple[str, Path, Path | None]:
    """(kind, folder to publish, eval.json beside it or None) of what ``root`` is.

    A dataset folder has manifest.json; a checkpoint folder config.json (+ model.safetensors);
    a run folder (``distill`` / ``teacher train`` / ``compass train`` ``--out``) its final
    checkpoint in ``final/`` and the run's ``eval.json``. A checkpoint named ``final`` takes
    the ``eval.json`` of its run folder.
    """
    from tsdfm.models.checkpoint import CONFIG_FILE

    if kind is not None and kind not in KINDS:
        raise HubError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    found: tuple[str, Path, Path | None] | None = None
    if (root / MANIFEST_FILE).is_file():
        found = ("dataset", root, None)
    elif (root / CONFIG_FILE).is_file():
        beside = root.parent / "eval.json" if root.name == "final" else root / "eval.json"
        found = ("model", root, beside if beside.is_file() else None)
    elif (root / "final" / CONFIG_FILE).is_file():
        beside = root / "eval.json"
        found = ("model", root / "final", beside if beside.is_file() else None)
    if found is None:
        raise HubError(
            f"{root} is neither a dataset folder (manifest.json) nor a checkpoint folder "
            f"(config.json + model.safetensors) nor a run folder with final/: pass one of those"
        )
    if kind is not None and found[0] != kind:
        what = "a dataset folder" if found[0] == "dataset" else "a checkpoint folder"
        raise HubError(f"{root} is {what}, not a {kind}: drop --kind {kind} or pass the other")
    return found


# publish -------------------------------------------------------------------------------------


@dataclass
class PublishResult:
    """What :func:`publish` did.

    Attributes:
        repo_id: the repo.
        version: the tag, ``vN``.
        commit: the tagged commit.
        pull_request: the PR number (None when nothing had to be uploaded).
        uploaded: paths uploaded by this run.
        already_published: the content was already tagged; nothing was changed.
        repo_type: "dataset" or "model".
    """

    repo_id: str
    version: str
    commit: str
    pull_request: int | None = None
    uploaded: list[str] = field(default_factory=list)
    already_published: bool = False
    repo_type: str = REPO_TYPE

    @property
    def load_line(self) -> str:
        if self.repo_type == "model":
            return f'load_checkpoint("{self.repo_id}@{self.version}")'
        return f'load_dataset("{self.repo_id}", revision="{self.version}", split="train")'

    @property
    def usage(self) -> list[str]:
        """The lines a consumer copies."""
        if self.repo_type == "model":
            return [
                "from tsdfm.models.checkpoint import load_checkpoint",
                f"ckpt = {self.load_line}",
                f"# or: tsdfm-pipeline sample --model {self.repo_id}@{self.version}",
            ]
        return ["from datasets import load_dataset", f"ds = {self.load_line}"]


def _batches(files: list[LocalFile], max_files: int, max_bytes: int) -> list[list[LocalFile]]:
    out: list[list[LocalFile]] = []
    cur: list[LocalFile] = []
    size = 0
    for f in files:
        if cur and (len(cur) >= max_files or size + f.size > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(f)
        size += f.size
    if cur:
        out.append(cur)
    return out


def publish(
    path: str | Path,
    repo_id: str,
    *,
    kind: str | None = None,
    private: bool = False,
    token: str | None = None,
    version: int | None = None,
    license: str | None = None,
    files_per_commit: int = 50,
    bytes_per_commit: int = 4 * 2**30,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> PublishResult:
    """Publish the dataset or checkpoint folder ``path`` to ``repo_id`` as version ``vN``.

    Args:
        path: a local dataset folder (it must pass ``verify``), a checkpoint folder (it must
            load with ``load_checkpoint``) or a run folder (its ``final/`` checkpoint).
        repo_id: org/name (a dataset repo for a dataset, a model repo for a checkpoint).
        kind: "dataset" or "model"; None: detected from the folder (:func:`locate`).
        private: create the repo private (an existing repo keeps its visibility).
        token: write token; default HF_TOKEN or the HF login.
        version: publish as ``v{version}``; default the next free integer.
        license: license of the card's metadata; None: the teacher's, else unknown.
        files_per_commit, bytes_per_commit: split the upload into commits of at most this many
            files / bytes, so an interrupted upload loses at most one commit's worth.
        policy, sleep: retry waits (tests pass a recording ``sleep``).
        log: progress lines.

    Returns:
        what was done; ``result.usage`` are the lines consumers copy.
    """
    say = log if log is not None else (lambda line: None)
    check_repo_id(repo_id)
    if files_per_commit < 1 or bytes_per_commit < 1:
        raise HubError("files_per_commit and bytes_per_commit must be positive")
    if version is not None and (not isinstance(version, int) or version < 1):
        raise HubError(f"version {version!r} must be a positive integer (published as vN)")
    root = Path(str(path)).expanduser()
    if "://" in str(path) or not root.is_dir():
        raise HubError(
            f"{path} is not a local folder: publish reads a local dataset or checkpoint folder "
            "(copy a remote one locally first)"
        )
    kind, folder, eval_file = locate(root, kind)
    secret = resolve_token(token, repo_id)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # its ConnectionError would be retried as an outage
        raise HubError(f"cannot publish to {repo_id}: {OFFLINE}")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tsdfm-publish-") as staging:
        if kind == "dataset":
            content = dataset_content(folder, license)
        else:
            content = model_content(folder, eval_file, license, Path(staging), say)
        hub = Hub(repo_id, secret, policy, sleep, say, content.repo_type)
        return publish_content(hub, content, private, version, files_per_commit, bytes_per_commit)


def publish_content(
    hub: Hub,
    content: Content,
    private: bool,
    version: int | None,
    files_per_commit: int,
    bytes_per_commit: int,
) -> PublishResult:
    """The flow every publication takes: create the repo, stop if a tag holds this content,
    else upload to a PR (or resume it), check, merge, and tag the merged commit."""
    repo_id, say, kind = hub.repo_id, hub.log, content.repo_type
    files = content.files

    def holds(revision: str) -> bool:
        fetch = (lambda p: hub.read(p, revision)) if content.tolerant else None
        return same_content(files, hub.tree(revision), fetch, content.owned)

    hub.call(
        f"creating {kind} repo {repo_id}",
        hub.api.create_repo,
        repo_id,
        repo_type=kind,
        private=private,
        exist_ok=True,
    )
    refs = hub.refs()
    tags = {t.name: t.target_commit for t in refs.tags}
    versions = sorted((parse_version(n), n) for n in tags if parse_version(n) is not None)
    for _, name in reversed(versions):
        if holds(tags[name]):
            if version is not None and name != f"v{version}":
                say(f"note: this content is already published as {name}; not tagging v{version}")
            say(f"{repo_id}: this content is already published as {name}; nothing to do")
            return PublishResult(repo_id, name, tags[name], already_published=True, repo_type=kind)
    if version is not None:
        tag = f"v{version}"
        if tag in tags:
            raise HubError(
                f"tag {tag} already exists on {repo_id} with different content; tags are "
                "immutable: publish without --version to get the next free one"
            )
    else:
        tag = f"v{(versions[-1][0] if versions else 0) + 1}"
    upload = [*files, LocalFile.from_bytes(CARD_FILE, content.card(repo_id, tag).encode())]

    main_head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
    uploaded: list[str] = []
    pr_num: int | None = None
    if main_head is not None and holds(main_head):
        say(f"main already holds this content (an earlier run merged it); tagging it {tag}")
        commit = main_head
    else:
        pr_num, uploaded = _upload_via_pr(hub, upload, content, files_per_commit, bytes_per_commit)

        def merged() -> bool | None:
            details = hub.api.get_discussion_details(repo_id, pr_num, repo_type=kind)
            return True if details.status == "merged" else None

        hub.call(
            f"merging pull request #{pr_num}",
            hub.api.merge_pull_request,
            repo_id,
            pr_num,
            repo_type=kind,
            comment=f"Upload complete and checked ({len(upload)} files); merged by tsdfm-pipeline.",
            settled=merged,
        )
        say(f"merged pull request #{pr_num}")
        refs = hub.refs()
        commit = next(b.target_commit for b in refs.branches if b.name == "main")
        if not holds(commit):
            raise HubError(
                f"main of {repo_id} does not hold the merged content (someone committed at the "
                "same time?); rerun the same command"
            )
    tag = _create_tag(hub, tag, commit, version is not None, content, say)
    say(f"tagged {commit[:12]} as {tag}")
    return PublishResult(repo_id, tag, commit, pr_num, uploaded, repo_type=kind)


def _upload_via_pr(
    hub: Hub,
    upload: list[LocalFile],
    content: Content,
    files_per_commit: int,
    bytes_per_commit: int,
) -> tuple[int, list[str]]:
    """Open (or resume) the PR of this content and upload what it lacks; (PR number, paths)."""
    from huggingface_hub import CommitOperationDelete

    repo_id, say, kind = hub.repo_id, hub.log, content.repo_type
    marker = f"[tsdfm {content_id(content.files)[:16]}]"

    def find_open() -> Any:
        """The open PR of this content, if there is one."""
        prs = hub.api.get_repo_discussions(
            repo_id, discussion_type="pull_request", discussion_status="open", repo_type=kind
        )
        return next((d for d in prs if marker in d.title), None)

    pr = hub.call("listing open pull requests", find_open)
    if pr is None:
        short = content.fingerprint.removeprefix("sha256:")[:12]
        title = f"Publish tsdfm {content.what} {short} {marker}"
        description = (
            f"{content.summary} Opened by `tsdfm-pipeline publish`; merged once every file is "
            "uploaded."
        )
        pr = hub.call(
            "opening a pull request",
            hub.api.create_pull_request,
            repo_id,
            title,
            description=description,
            repo_type=kind,
            settled=find_open,  # a lost answer must not open a second PR
        )
        say(f"opened pull request #{pr.num}")
    else:
        say(f"resuming pull request #{pr.num}")
    ref = f"refs/pr/{pr.num}"
    remote = hub.tree(ref)
    todo = [f for f in upload if not f.matches(remote.get(f.path))]
    wanted = {f.path for f in upload}
    stale = sorted(p for p in remote if content.owned(p) and p not in wanted)
    if len(todo) < len(upload):
        say(f"{len(upload) - len(todo)} file(s) already on {ref}; uploading {len(todo)}")
    first = [f for f in todo if content.bulk(f.path)]
    last = [f for f in todo if not content.bulk(f.path)]
    batches = _batches(first, files_per_commit, bytes_per_commit)
    if last or stale:
        batches.append(last)
    uploaded: list[str] = []
    for n, batch in enumerate(batches, start=1):
        deletes = stale if n == len(batches) else []
        names = [f.path for f in batch]

        def commit(batch=batch, deletes=deletes):
            ops = [f.operation() for f in batch]
            ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
            return hub.api.create_commit(
                repo_id,
                ops,
                commit_message=f"Add {len(batch)} file(s)"
                + (f", remove {len(deletes)} stale" if deletes else ""),
                revision=ref,
                repo_type=kind,
            )

        hub.call(f"uploading commit {n}/{len(batches)} to {ref}", commit)
        uploaded += names
        say(f"uploaded {len(names)} file(s) to {ref} ({n}/{len(batches)})")
    final = hub.tree(ref)
    wrong = [f.path for f in upload if not f.matches(final.get(f.path))]
    extra = [p for p in final if content.owned(p) and p not in wanted]
    if wrong or extra:
        raise HubError(
            f"pull request #{pr.num} does not hold the folder after the upload (differs: "
            f"{(wrong + extra)[:3]}); rerun the same command to finish it"
        )
    return pr.num, uploaded


def _create_tag(
    hub: Hub, tag: str, commit: str, explicit: bool, content: Content, say: Callable[[str], None]
) -> str:
    """Tag ``commit``; on a race for the tag name, take the next free one (unless explicit)."""
    for _ in range(20):
        try:
            hub.call(
                f"creating tag {tag}",
                hub.api.create_tag,
                hub.repo_id,
                tag=tag,
                revision=commit,
                tag_message=f"tsdfm {content.what} {content.fingerprint}",
                repo_type=content.repo_type,
            )
            return tag
        except HubError as e:
            if e.status != 409:
                raise
        tags = {t.name: t.target_commit for t in hub.refs().tags}
        if tags.get(tag) == commit:
            return tag
        if explicit:
            raise HubError(
                f"tag {tag} was just created on {hub.repo_id} for another commit; tags are "
                "immutable: publish without --version"
            )
        taken = [v for v in (parse_version(n) for n in tags) if v is not None]
        say(f"tag {tag} was taken meanwhile; trying the next version")
        tag = f"v{max(taken, default=0) + 1}"
    raise HubError(f"could not find a free version tag on {hub.repo_id}; retry later")


# checkpoints as huggingface_hub names the calls ------------------------------------------------


def push_to_hub(ckpt_dir: str | Path, repo_id: str, **kwargs: Any) -> PublishResult:
    """Publish a checkpoint (or run) folder to the model repo ``repo_id``: :func:`publish`
    with ``kind="model"`` (PR → merge → tag ``vN``, generated model card); ``kwargs`` are
    :func:`publish`'s (``private``, ``token``, ``version``, ``license``, …)."""
    return publish(ckpt_dir, repo_id, kind="model", **kwargs)


def from_pretrained(repo_or_path: str | Path, revision: str | None = None, **kwargs: Any):
    """The checkpoint at a local folder or ``org/name`` (at ``revision``, e.g. a ``vN``
    tag): ``tsdfm.models.checkpoint.load_checkpoint`` (``kwargs``: its ``device``, ``role``)."""
    from tsdfm.models.checkpoint import load_checkpoint

    return load_checkpoint(revision_spec(str(repo_or_path), revision), **kwargs)


def revision_spec(spec: str, revision: str | None, error: type[Exception] = HubError) -> str:
    """``org/name`` and a revision as the project's ``org/name@revision``; ``spec`` itself
    when ``revision`` is None. A revision given for a local folder or for a spec that names
    one already is refused (``error``, one line)."""
    if revision is None:
        return spec
    if Path(spec).expanduser().exists() or "@" in spec:
        raise error(
            f"revision={revision!r} applies to a Hub repo id, not to {spec}: pass "
            "org/name with revision, or a local folder without it"
        )
    return f"{spec}@{revision}"
