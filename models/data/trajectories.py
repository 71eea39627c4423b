"""Reading a trajectory dataset (docs/schema.md) as training examples for a few-step student.

A dataset is a local folder, a Hub dataset ``org/name[@revision]`` (also written
``hf://datasets/org/name@revision``) or a folder at any fsspec URL (``file://``, ``s3://``,
``gs://``, ``memory://``, …) of Parquet shards, one row per trajectory on the student grid
t_0 = 0 < t_1 < … < t_S = 1. Segment k of a trajectory is one training example:

    x_t = states[k],  t = t_k,  h = t_{k+1} − t_k,
    x_{t+h} = states[k+1]   (the next midpoint: what the trajectory's own jump landed on)
    x_1 = states[S]         (the final sequence)

Reading (``datasets`` streaming, one file = one ``datasets`` shard):

* **Streams.** Epoch e permutes the shard files with a generator seeded by (seed, e); stream s
  of P reads files ``perm[s::P]`` in that order. Torch DataLoader workers execute the streams
  (worker w runs streams s ≡ w mod num_workers), so several shards are read and decoded in
  parallel, and the batch sequence depends on P but not on the number of workers.
* **Shuffling.** A stream reads ``shuffle_buffer`` consecutive trajectories (a window, which
  may span files), permutes them with a generator seeded by (seed, e, s, window) and emits all
  S segments of each; batches of ``batch_size`` examples are cut from that sequence (the last
  partial batch of a stream in an epoch is dropped). The main process takes batches from the
  streams round-robin.
* **Position.** Every batch carries its stream's resume point: the window's first row (file,
  row), the window's index and how many of its examples were consumed. The loader's state is
  those points plus the epoch and the round-robin pointer, a JSON object: a resumed run seeks
  straight to it (at most one file is re-read up to the row) and continues with the identical
  batch sequence.
* **Integrity** (``tsdfm.models.data.integrity``, on unless ``verify=False``): before a shard
  file is
  decoded, its size and sha256 are checked against ``manifest.json`` when the folder has one;
  every row read is checked against the dataset contract (ids, grid, shapes, token ranges,
  reveal-once). Paths the card lists must lie inside the dataset folder.
* **Object stores** (:func:`stage_dataset`). A folder at an fsspec URL is copied once into a
  local cache (``$TSDFM_CACHE/datasets``, else ``~/.cache/tsdfm-pipeline/datasets``): its
  manifest.json and card first, then every Parquet file under data/, each written to a
  temporary name, checked against the manifest's size and sha256 and only then renamed into
  place (a cached copy that still matches is kept; files gone from the store are removed).
  The local reader then runs on the copy with all the checks above, so a dataset on S3 is
  checked exactly like a folder, and the bytes trained on are the bytes that were checked.
* **Held-out split.** A trajectory is held out iff u(trajectory_id) < ``heldout_fraction``, u a
  splitmix64 hash mapped to [0, 1): the same trajectories for every run and student on a
  dataset, whatever the seed; training never sees them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsdfm.models.data.integrity import (
    MANIFEST_FILE,
    RowRules,
    ShardDigest,
    check_digest,
    check_split_files,
    fix_hint,
    read_manifest_digests,
)
from tsdfm.models.data.schema import (
    TRAIN_COLUMNS,
    MetadataError,
    RowError,
    TrajectoryRows,
    check_schema_version,
    decode_rows,
    grid_is,
    grid_rises_from_0_to_1,
    parquet_footer,
    stored_columns,
    trajectory_schema,
)
from tsdfm.models.errors import ConfigError, DataError, ShardError
from tsdfm.models.paths import confined
from tsdfm.models.refs import parse_hub_ref

SPLIT = "train"
CARD_FILE = "README.md"
_HF_REVISION = re.compile(r"^hf://datasets/[^@]+@([^/]+)/")
_HF_DATASET = re.compile(
    r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?(?P<rest>/.*)?$"
)
_URL = re.compile(r"^(?P<protocol>[a-zA-Z][a-zA-Z0-9+.-]*)://")


# --------------------------------------------------------------------------- dataset identity
@dataclass(frozen=True)
class DatasetRef:
    """What the user passed: a local folder, a Hub id with an optional revision, or a folder
    at an fsspec URL (then ``id`` is its local copy, :func:`stage_dataset`).

    Attributes:
        id: the local folder, or the Hub repo id.
        revision: the Hub revision (None: the default branch; always None for a folder).
        local: whether ``id`` is a local folder.
        url: the fsspec URL the folder was copied from (None: the user passed a folder or id).
    """

    id: str
    revision: str | None
    local: bool
    url: str | None = None

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
        return self.id + (f"@{self.revision}" if self.revision else "")


def dataset_cache_root() -> Path:
    """Where copies of datasets read from object stores live: ``$TSDFM_CACHE/datasets``, else
    ``$XDG_CACHE_HOME/tsdfm-pipeline/datasets`` (``~/.cache`` without XDG_CACHE_HOME)."""
    if os.environ.get("TSDFM_CACHE"):
        return Path(os.environ["TSDFM_CACHE"]).expanduser() / "datasets"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tsdfm-pipeline" / "datasets"


def parse_dataset_spec(spec: str | Path, verify: bool = True) -> DatasetRef:
    """``/path/to/folder``, ``org/name[@revision]``, ``hf://datasets/org/name[@revision]``,
    ``file:///path/to/folder`` or a folder at any other fsspec URL (copied into the local
    cache first, its shards checked against its manifest as they land; :func:`stage_dataset`).
    """
    text = str(spec)
    url = _URL.match(text)
    if url is not None:
        hub = _HF_DATASET.match(text)
        if hub is not None:
            if (hub.group("rest") or "/").strip("/"):
                raise DataError(
                    f"dataset {text}: a Hub dataset is read whole; pass "
                    f"hf://datasets/{hub.group('repo')}[@revision] without a path inside it"
                )
            return DatasetRef(hub.group("repo"), hub.group("rev"), False)
        if text.startswith("hf://"):
            raise DataError(
                f"dataset {text}: a Hub dataset URL is hf://datasets/org/name[@revision]"
            )
        if url.group("protocol") == "file":
            return parse_dataset_spec(_local_path(text), verify)
        return stage_dataset(text, verify=verify)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(
                f"dataset {text} is a file; pass the dataset folder (the one holding data/)"
            )
        return DatasetRef(str(path.resolve()), None, True)
    name, at, revision = text.partition("@")
    if at and Path(name).expanduser().exists():
        raise DataError(
            f"{text}: a local folder has no revisions; drop '@{revision}' or pass a Hub id"
        )
    ref = parse_hub_ref(text)
    if ref is not None:
        return DatasetRef(ref.repo_id, ref.revision, False)
    raise DataError(
        f"dataset {text} not found: give an existing folder or a Hub id like org/name[@revision]"
    )


def _local_path(url: str) -> str:
    from fsspec.core import url_to_fs

    return url_to_fs(url)[1]


def _filesystem(url: str):
    """(fsspec filesystem, path) of a URL, or a DataError naming the missing package."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url)
    except ImportError as e:
        raise DataError(
            f"reading {url} needs an fsspec driver that is not installed ({e}); install it "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://) or copy the dataset to a folder"
        ) from None
    except ValueError as e:
        raise DataError(f"{url} is not a storage URL fsspec knows ({e})") from None


def stage_dataset(url: str, cache: Path | None = None, verify: bool = True) -> DatasetRef:
    """Copy the dataset folder at the fsspec ``url`` into the local cache; its local ref.

    The manifest and the card are copied first; then every Parquet file under data/ is
    copied to a temporary name, checked against the manifest's size and sha256 (when
    ``verify`` and the folder has a manifest) and renamed into place; a copy that already
    matches its digest is kept. Files no longer in the store are removed from the copy. The
    local reader then applies every check of a local folder to the copy.

    Args:
        url: the dataset folder (``s3://bucket/ds``, ``memory://ds``, …).
        cache: the cache root (default :func:`dataset_cache_root`).
        verify: check the shards while copying (``--no-verify``: copied as they are).
    """
    fs, root = _filesystem(url)
    root = root.rstrip("/")
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    local = (cache or dataset_cache_root()) / f"{Path(root).name or 'dataset'}-{key}"
    try:
        if not fs.isdir(root):
            raise DataError(f"dataset {url} not found: no folder at that URL")
        shards = sorted(
            p for p in fs.find(f"{root}/data") if p.endswith(".parquet")
        )  # fsspec paths without the protocol
        local.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST_FILE, CARD_FILE):
            target = local / name
            if fs.isfile(f"{root}/{name}"):
                _copy_in(fs, f"{root}/{name}", target)
            else:
                target.unlink(missing_ok=True)
        digests = read_manifest_digests(local) if verify else None
        wanted = set()
        for remote in shards:
            rel = remote[len(root) + 1 :]
            target = confined(local, rel, f"shard {rel} of {url}")
            wanted.add(target)
            digest = None if digests is None else digests.get(target)
            if digest is not None and target.exists():
                try:
                    check_digest(target, digest, local)
                    continue  # the cached copy is the recorded shard
                except ShardError:
                    pass
            _copy_in(fs, remote, target)
            if digest is not None:
                try:
                    check_digest(target, digest, local)
                except ShardError as e:
                    target.unlink(missing_ok=True)
                    raise ShardError(
                        f"dataset {url}: {e}".replace(fix_hint(str(local)), fix_hint(url))
                    ) from None
        for old in (local / "data").rglob("*.parquet") if (local / "data").exists() else ():
            if old.resolve() not in wanted:
                old.unlink()
    except OSError as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise DataError(
            f"dataset {url} cannot be read ({type(e).__name__}: {first}); check the URL and "
            "your credentials for that store"
        ) from None
    return DatasetRef(str(local.resolve()), None, True, url)


def _copy_in(fs, remote: str, target: Path) -> None:
    """``remote`` copied to ``target`` through a temporary name (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with fs.open(remote, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _resolve_files(ref: DatasetRef) -> list[str]:
    """The Parquet files of the train split, in order (local paths or hf:// URLs)."""
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(ref.id, revision=ref.revision)
    except Exception as e:  # datasets and huggingface_hub raise many unrelated types
        raise DataError(_unreadable(ref, e)) from None
    files = (builder.config.data_files or {}).get(SPLIT)
    if not files:
        raise DataError(
            f"dataset {ref} has no '{SPLIT}' split of Parquet files (data/train-*.parquet); "
            "is it a tsdfm trajectory dataset?"
        )
    bad = [f for f in files if not str(f).endswith(".parquet")]
    if bad:
        raise DataError(f"dataset {ref} lists non-Parquet data files ({bad[0]}); rebuild it")
    if not ref.local:
        return [str(f) for f in files]
    root = Path(ref.id)
    what = "a train-split file of the dataset card (README.md configs[].data_files)"
    return [str(confined(root, os.path.relpath(f, root), f"{what}, {f},")) for f in files]


def _unreadable(ref: DatasetRef, e: Exception) -> str:
    kind = type(e).__name__
    first = (str(e).splitlines() or [""])[0][:200]
    if ref.local:
        return f"dataset folder {ref.id} is unreadable ({kind}: {first})"
    if "Revision" in kind or (ref.revision and "revision" in first.lower()):
        return (
            f"revision {ref.revision!r} of the Hub dataset {ref.id} cannot be read ({kind}); "
            "check the tag, branch or commit name"
        )
    return (
        f"Hub dataset {ref} cannot be read ({kind}: {first}); check the id, the revision, "
        "the network or HF_ENDPOINT and your token, or pass a local folder"
    )


def _read_footer(url: str) -> tuple[list[str], dict]:
    """(column names, ``tsdfm`` metadata) of one shard, reading only its footer
    (``tsdfm.models.data.schema.parquet_footer``; unknown metadata keys are accepted)."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            footer = parquet_footer(f)
        return footer.schema.names, footer.tsdfm()
    except OSError as e:
        raise DataError(f"shard {url} is not a readable Parquet file ({e})") from None
    except MetadataError as e:
        raise DataError(f"shard {url}: {e}; rebuild it or download it again") from None
    except DataError as e:  # not Parquet
        raise DataError(f"shard {url} {e}") from None


def check_shard_footer(url: str, names: list[str], info: dict) -> int:
    """Schema version and columns of one shard, or a DataError that says what to do; returns
    the version (v1 and v2 are read alike: ``schema.decode_rows``)."""
    try:
        version = check_schema_version(info)
    except DataError as e:
        raise DataError(f"shard {url} {e}") from None
    want = stored_columns(trajectory_schema(1).names, version)
    missing = [c for c in want if c not in names and not (c == "text" and version == 2)]
    if missing:
        raise DataError(
            f"shard {url} lacks the column(s) {', '.join(missing)} of the trajectory schema "
            f"v{version}; it is not a tsdfm trajectory dataset, or it was altered"
        )
    return version


@dataclass(frozen=True)
class TrajectorySource:
    """An opened trajectory dataset: its files, grid and provenance.

    Attributes:
        ref: what the user passed.
        files: the shard files (local paths or hf:// URLs), in name order.
        metadata: the ``tsdfm`` metadata of the first shard.
        times: (S+1,) float32 time grid t_0 … t_S read from the first trajectory.
        seq_len: L.
        resolved_revision: the Hub commit the files were read at (None for a local folder).
        verify: whether reads are checked (``tsdfm.models.data.integrity``).
        digests: manifest.json's record of each shard by file path (None: not checked).
        rules: the row invariants checked on every row read (None: not checked).
        hub_checked: a Hub dataset whose shards' content hashes (the Hub's LFS sha256 at the
            resolved commit) were checked against its manifest.json (:func:`check_hub_shards`).
    """

    ref: DatasetRef
    files: tuple[str, ...]
    metadata: dict
    times: np.ndarray
    seq_len: int
    resolved_revision: str | None
    verify: bool = True
    digests: dict[Path, ShardDigest] | None = None
    rules: RowRules | None = None
    hub_checked: bool = False

    @property
    def num_steps(self) -> int:
        """S, the number of segments (student steps) of the dataset's grid."""
        return int(self.times.shape[0] - 1)

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get("fingerprint")

    def provenance(self) -> dict:
        """What a student records about the data it was trained on."""
        m = self.metadata
        return {
            "id": self.ref.url or self.ref.id,
            "revision": self.ref.revision,
            "resolved_revision": self.resolved_revision,
            "local": self.ref.local,
            "fingerprint": m.get("fingerprint"),
            "schema_version": m.get("schema_version"),
            "teacher_identity": m.get("teacher_identity"),
            "compass_identity": m.get("compass_identity"),
            "tokenizer_identity": m.get("tokenizer_identity"),
            "num_shards": len(self.files),
            "student_steps": self.num_steps,
            "times": [float(t) for t in self.times],
            "reveal_order": (m.get("config") or {})
            .get("navigator", {})
            .get("reveal_order", "random"),
        }

    def verification(self) -> dict:
        """What the reads of this dataset check, as a student records it."""
        if not self.verify:
            sha = "off (--no-verify)"
        elif self.digests is not None:
            sha = f"every shard against {self.ref.url or self.ref.id}/manifest.json"
        elif self.ref.local:
            sha = "not checked: the folder has no manifest.json"
        elif self.hub_checked:
            sha = (
                f"every shard's Hub content hash (LFS sha256 at {self.resolved_revision}) "
                f"against {self.ref.id}/manifest.json"
            )
        else:
            sha = "not checked: the Hub dataset has no manifest.json"
        return {
            "verified": self.verify,
            "sha256": sha,
            "rows": "every row read" if self.rules is not None else "off (--no-verify)",
        }

    def with_vocabulary(self, vocab_size: int, mask_token_id: int | None) -> TrajectorySource:
        """The same dataset, its rows also checked against a model's token ranges (V data
        tokens; the [MASK] id under the mask source, None under the uniform one)."""
        if self.rules is None:
            return self
        return replace(
            self, rules=replace(self.rules, vocab_size=vocab_size, mask_token_id=mask_token_id)
        )

    def shard_name(self, index: int) -> str:
        """Shard file ``index`` as messages name it: relative to a local folder, else its URL."""
        url = self.files[index]
        if self.ref.local:
            return Path(url).relative_to(self.ref.id).as_posix()
        return url

    def file_dataset(self, index: int, columns: tuple[str, ...] = TRAIN_COLUMNS, version: int = 1):
        """Shard file ``index`` as a streaming ``datasets.IterableDataset`` of the columns that
        store the fields ``columns`` in schema ``version`` (``schema.stored_columns``)."""
        from datasets import load_dataset

        # datasets logs a shard that fails to decode before raising; iter_tables reports it in
        # one line of its own
        logging.getLogger("datasets.packaged_modules.parquet.parquet").setLevel(logging.CRITICAL)

        return load_dataset(
            "parquet",
            data_files={SPLIT: [self.files[index]]},
            split=SPLIT,
            streaming=True,
            columns=list(stored_columns(columns, version)),
        )

    def check_digest(self, index: int) -> None:
        """Size and sha256 of shard file ``index`` against manifest.json (when verifying)."""
        if self.digests is not None:
            path = Path(self.files[index])
            check_digest(path, self.digests[path], Path(self.ref.id))

    def check_shard(self, index: int) -> dict:
        """The digest (when verifying), then the footer: columns, schema version and
        fingerprint of shard file ``index``. Returns its ``tsdfm`` metadata."""
        url = self.files[index]
        self.check_digest(index)
        names, info = _read_footer(url)
        check_shard_footer(url, names, info)
        if info.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"shard {url} was built with fingerprint {info.get('fingerprint')}, the first "
                f"shard with {self.fingerprint}: shards of different builds are mixed; rebuild "
                "or re-download the dataset"
            )
        return info

    def iter_tables(self, index: int, rows: int, skip: int = 0) -> Iterator[Any]:
        """Arrow tables of ≤ ``rows`` rows of shard file ``index``, after skipping ``skip``;
        the shard is checked first (:meth:`check_shard`) and, when verifying, every row."""
        info = self.check_shard(index)
        first_id = _first_id(info)
        version = check_schema_version(info)
        tables = self.file_dataset(index, TRAIN_COLUMNS, version)
        tables = tables.with_format("arrow").iter(batch_size=rows)
        row = 0
        while True:
            try:
                table = next(tables, None)
            except Exception as e:  # pyarrow, fsspec and datasets raise many unrelated types
                raise DataError(
                    f"shard {self.shard_name(index)} does not decode ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0][:160]}): {fix_hint(self.ref.id)}"
                ) from None
            if table is None:
                return
            row += table.num_rows
            if skip >= table.num_rows:
                skip -= table.num_rows
                continue
            if skip:
                table, skip = table.slice(skip), 0
            if self.rules is not None:
                self._check_rows(index, table, row - table.num_rows, first_id)
            yield table

    def _check_rows(self, index: int, table, start: int, first_id: int | None) -> None:
        """The contract's row invariants (``self.rules``) on ``table`` (rows ``start``… of
        shard ``index``, whose row 0 has the id ``first_id`` when known), or a DataError
        naming the shard, the row and the fix."""
        assert self.rules is not None
        where = f"shard {self.shard_name(index)}"
        steps = self.num_steps if self.seq_len else None
        try:
            rows = decode_rows(table, TRAIN_COLUMNS, steps=steps, seq_len=self.seq_len or None)
            broken = self.rules.broken(rows, None if first_id is None else first_id + start)
        except RowError as e:
            broken = e.first, e.what
        except DataError as e:
            raise DataError(f"{where}: {e}; {fix_hint(self.ref.id)}") from None
        if broken is not None:
            r, what = broken
            tid = table.column("trajectory_id")[r].as_py()
            raise DataError(
                f"{where}, row {start + r} (trajectory_id {tid}), breaks the dataset contract "
                f"('{what}'): {fix_hint(self.ref.id)}"
            )


def _first_id(info: dict) -> int | None:
    """shard · rows_per_shard from a shard's metadata: the trajectory_id of its row 0."""
    shard = info.get("shard")
    rows = (info.get("config") or {}).get("trajectories_per_shard")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (shard, rows)):
        return shard * rows
    return None


def open_trajectory_dataset(spec: str | Path, verify: bool = True) -> TrajectorySource:
    """Resolve a dataset, check its first shard's columns and schema version, read its grid.

    Args:
        spec: a dataset folder, Hub id ``org/name[@revision]`` or fsspec URL
            (:func:`parse_dataset_spec`).
        verify: check what is read (``tsdfm.models.data.integrity``): for a local folder with a
            manifest.json, the split against it and the sha256 of every shard (here, and again
            before a shard is decoded if its file changed since), and every row read against
            the dataset contract.
    """
    ref = parse_dataset_spec(spec, verify)
    files = _resolve_files(ref)
    digests = None
    if verify and ref.local:
        root = Path(ref.id)
        digests = read_manifest_digests(root)
        if digests is not None:
            check_split_files(root, [Path(f) for f in files], digests)
    match = _HF_REVISION.match(files[0])
    hub_checked = False
    if verify and not ref.local and match is not None:
        hub_checked = check_hub_shards(ref, match.group(1), files)
    source = TrajectorySource(
        ref=ref,
        files=tuple(files),
        metadata={},
        times=np.zeros(2, np.float32),
        seq_len=0,
        resolved_revision=match.group(1) if match else None,
        verify=verify,
        digests=digests,
        rules=RowRules() if verify else None,
        hub_checked=hub_checked,
    )
    for index in range(len(files)):  # every shard before the first step; reads re-check
        source.check_digest(index)  # (a stat, unless the file changed since)
    names, meta = _read_footer(files[0])
    check_shard_footer(files[0], names, meta)
    source = replace(source, metadata=meta)
    first = next(source.iter_tables(0, 1), None)
    if first is None or first.num_rows == 0:
        raise DataError(f"the first shard of dataset {ref} holds no trajectories; rebuild it")
    rows = table_arrays(first, None)
    times = rows.times[0]
    if grid_rises_from_0_to_1(rows.times[:1]).any():
        raise DataError(
            f"dataset {ref} has the time grid {times.tolist()}; a trajectory grid must rise "
            "strictly from 0 to 1"
        )
    rules = None if source.rules is None else replace(source.rules, grid=tuple(times.tolist()))
    return replace(source, times=times, seq_len=int(rows.states.shape[2]), rules=rules)


# --------------------------------------------------------------------------- rows → examples
def check_hub_shards(ref: DatasetRef, commit: str, files: list[str]) -> bool:
    """The train files of a Hub dataset at ``commit`` are the shards its manifest.json records:
    the same set, and each file's content hash on the Hub (the sha256 of its LFS object, which
    the Hub computes from the bytes it serves) equals the recorded sha256 and size. Nothing is
    downloaded but the manifest. False when the dataset has no manifest.json (the rows are
    still checked as they are read); a ShardError naming the shard otherwise.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    where = f"dataset {ref.id}@{ref.revision or 'main'} (commit {commit[:12]})"
    fix = (
        "its files were changed after the build wrote its manifest: use the revision the "
        "dataset was published at, or rebuild and republish it"
    )
    try:
        path = Path(hf_hub_download(ref.id, MANIFEST_FILE, repo_type="dataset", revision=commit))
    except EntryNotFoundError:
        return False
    except Exception as e:  # huggingface_hub raises many unrelated types
        raise DataError(_unreadable(ref, e)) from None
    digests = read_manifest_digests(path.parent)
    if digests is None:
        return False
    recorded = {d.name: d for d in digests.values()}
    prefix = f"hf://datasets/{ref.id}@{commit}/"
    names = [f[len(prefix) :] if f.startswith(prefix) else f for f in files]
    extra = sorted(set(names) - set(recorded))
    missing = sorted(set(recorded) - set(names))
    if extra or missing:
        what = f"{extra[0]} is not in" if extra else f"{missing[0]} is in"
        raise ShardError(f"{where}: {what} its {MANIFEST_FILE} but not in its train split; {fix}")
    try:
        infos = HfApi().get_paths_info(ref.id, names, repo_type="dataset", revision=commit)
    except Exception as e:
        raise DataError(_unreadable(ref, e)) from None
    found = {info.path: info for info in infos}
    for name in names:
        info, want = found.get(name), recorded[name]
        lfs = getattr(info, "lfs", None)
        if lfs is None:
            raise ShardError(
                f"{where}: shard {name} is not stored as an LFS object on the Hub, so its content "
                f"hash cannot be checked against {MANIFEST_FILE}; republish it with tsdfm-pipeline "
                "publish (or pass --no-verify)"
            )
        if lfs.sha256 != want.sha256 or lfs.size != want.bytes:
            raise ShardError(
                f"{where}: shard {name} has sha256 {lfs.sha256[:16]}… ({lfs.size} bytes) on the "
                f"Hub, {MANIFEST_FILE} records {want.sha256[:16]}… ({want.bytes} bytes); {fix}"
            )
    return True


def table_arrays(table, times_ref: np.ndarray | None) -> TrajectoryRows:
    """An Arrow table of (trajectory_id, times, states) decoded (``schema.decode_rows``).

    Args:
        table: rows of the trajectory schema (at least the three columns).
        times_ref: the dataset's grid; every row must carry exactly it (None: take the first
            row's).

    Raises:
        DataError: a row of another shape or grid (shards of different builds are mixed).
    """
    steps = None if times_ref is None else len(times_ref) - 1
    try:
        rows = decode_rows(table, TRAIN_COLUMNS, steps=steps)
    except RowError as e:
        r = e.first
        raise DataError(
            f"row {r} (trajectory_id {table.column('trajectory_id')[r].as_py()}) breaks "
            f"'{e.what}' (every trajectory of a dataset has the same S and L)"
        ) from None
    if times_ref is not None:
        bad = grid_is(rows.times, times_ref)
        if bad.any():
            raise DataError(
                f"a trajectory has the time grid {rows.times[bad][0].tolist()}, the dataset's "
                f"first has {times_ref.tolist()}: shards of different builds are mixed"
            )
    return rows


@dataclass(frozen=True)
class Examples:
    """Training examples, one per (trajectory, segment k), as numpy arrays.

    Attributes:
        x_t: (n, L) state at t_k.
        t: (n,) t_k.
        h: (n,) t_{k+1} − t_k.
        x_next: (n, L) state at t_{k+1}.
        x_1: (n, L) final sequence states[S].
        trajectory_id: (n,) int64.
        segment: (n,) int64 k.
    """

    x_t: np.ndarray
    t: np.ndarray
    h: np.ndarray
    x_next: np.ndarray
    x_1: np.ndarray
    trajectory_id: np.ndarray
    segment: np.ndarray

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def take(self, index: np.ndarray | slice) -> Examples:
        return Examples(**{k: v[index] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: list[Examples]) -> Examples:
        names = Examples.__dataclass_fields__
        return Examples(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in names})

    def tensors(self) -> ExampleBatch:
        return ExampleBatch(
            x_t=torch.from_numpy(self.x_t.astype(np.int64)),
            t=torch.from_numpy(self.t),
            h=torch.from_numpy(self.h),
            x_next=torch.from_numpy(self.x_next.astype(np.int64)),
            x_1=torch.from_numpy(self.x_1.astype(np.int64)),
            trajectory_id=torch.from_numpy(self.trajectory_id),
            segment=torch.from_numpy(self.segment),
        )


def trajectory_examples(times: np.ndarray, states: np.ndarray, ids: np.ndarray) -> Examples:
    """Every segment of every trajectory as an example, trajectory-major (k fastest).

    For trajectory j and segment k: x_t = states[j, k], t = times[k],
    h = times[k+1] − times[k] (the difference taken in float64, stored as float32),
    x_next = states[j, k+1], x_1 = states[j, S].

    Args:
        times: (S+1,) grid.
        states: (n, S+1, L) token ids.
        ids: (n,) trajectory ids.
    """
    n, S1, L = states.shape
    S = S1 - 1
    grid = times.astype(np.float64)
    k = np.tile(np.arange(S), n)
    j = np.repeat(np.arange(n), S)
    return Examples(
        x_t=states[:, :S].reshape(n * S, L),
        t=np.tile(grid[:S], n).astype(np.float32),
        h=np.tile(np.diff(grid), n).astype(np.float32),
        x_next=states[:, 1:].reshape(n * S, L),
        x_1=np.repeat(states[:, S], S, axis=0),
        trajectory_id=ids[j].astype(np.int64),
        segment=k.astype(np.int64),
    )


@dataclass
class ExampleBatch:
    """A batch of examples as tensors (tokens int64, t and h float32); see :class:`Examples`."""

    x_t: torch.Tensor
    t: torch.Tensor
    h: torch.Tensor
    x_next: torch.Tensor
    x_1: torch.Tensor
    trajectory_id: torch.Tensor
    segment: torch.Tensor

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ExampleBatch:
        return ExampleBatch(
            **{k: v.to(device, non_blocking=non_blocking) for k, v in self.__dict__.items()}
        )

    def pin_memory(self) -> ExampleBatch:
        return ExampleBatch(**{k: v.pin_memory() for k, v in self.__dict__.items()})


def heldout_mask(trajectory_id: np.ndarray, fraction: float) -> np.ndarray:
    """True for held-out trajectories: splitmix64(id) / 2^64 < fraction (seed-independent)."""
    z = trajectory_id.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


# --------------------------------------------------------------------------- the loader
@dataclass(frozen=True)
class LoaderConfig:
    """How trajectories become batches (everything here decides the batch sequence).

    Args:
        batch_size: examples per batch (segments of several trajectories).
        shuffle_buffer: trajectories per shuffled window of a stream.
        streams: P, shard streams read in parallel and interleaved round-robin.
        heldout_fraction: share of trajectory ids held out (0 disables the split).
        seed: seed of shard permutations and window shuffles.
        read_rows: rows per Arrow table read from a shard.
    """

    batch_size: int = 64
    shuffle_buffer: int = 256
    streams: int = 4
    heldout_fraction: float = 0.02
    seed: int = 0
    read_rows: int = 64

    def __post_init__(self) -> None:
        for name in ("batch_size", "shuffle_buffer", "streams", "read_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction={self.heldout_fraction} must lie in [0, 1)")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be non-negative")


@dataclass
class StreamPosition:
    """Where a stream resumes: in its epoch ``epoch``, window ``window`` starts at row ``row``
    of its ``file``-th file (in the stream's file order) and its first ``offset`` examples are
    consumed; ``done``: the stream has no more batches in that epoch."""

    file: int = 0
    row: int = 0
    window: int = 0
    offset: int = 0
    done: bool = False
    epoch: int = 0


@dataclass
class LoaderState:
    """The data position of one lane (see :class:`TrajectoryLoader`): its epoch, its
    round-robin pointer (an index into the lane's streams), the batches it gave, and the
    position of every stream of the job (those of other lanes are carried, not advanced)."""

    epoch: int = 0
    pointer: int = 0
    batches: int = 0
    streams: list[StreamPosition] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "pointer": self.pointer,
            "batches": self.batches,
            "streams": [dict(s.__dict__) for s in self.streams],
        }

    @staticmethod
    def from_dict(d: dict) -> LoaderState:
        epoch = int(d["epoch"])  # a stream without its own epoch is in the state's
        return LoaderState(
            epoch=epoch,
            pointer=int(d["pointer"]),
            batches=int(d.get("batches", 0)),
            streams=[StreamPosition(**{"epoch": epoch, **s}) for s in d["streams"]],
        )


def merge_lane_states(states: list[dict]) -> dict:
    """The job's data position from the states of its lanes (``states[r]`` of lane r): each
    stream's position from the lane that owns it (stream s belongs to lane s mod lanes), each
    lane's epoch, pointer and batch count.

    The result is what :meth:`TrajectoryLoader.load_state_dict` takes, on any number of
    lanes; with one lane it is that lane's state.
    """
    lanes = len(states)
    if lanes == 1:
        return states[0]
    streams = [states[s % lanes]["streams"][s] for s in range(len(states[0]["streams"]))]
    return {
        "epoch": min(st["epoch"] for st in states),
        "pointer": states[0]["pointer"],
        "batches": sum(st["batches"] for st in states),
        "streams": streams,
        "lanes": [{k: st[k] for k in ("epoch", "pointer", "batches")} for st in states],
    }


def epoch_files(num_files: int, seed: int, epoch: int, stream: int, streams: int) -> list[int]:
    """The shard files of ``stream`` in ``epoch``: a seeded permutation, every P-th entry."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_files)
    return [int(i) for i in perm[stream::streams]]


class _RowReader:
    """Sequential rows over a list of shard files, from (file position, row)."""

    def __init__(self, source: TrajectorySource, files: list[int], pos: int, row: int, rows: int):
        self.source, self.files, self.rows = source, files, rows
        self.pos, self.row = pos, row  # position of the next unread row
        self._tables: Iterator[Any] | None = None
        self._pending = None

    def _next_table(self):
        while self.pos < len(self.files):
            if self._tables is None:
                self._tables = self.source.iter_tables(self.files[self.pos], self.rows, self.row)
            table = next(self._tables, None)
            if table is not None and table.num_rows:
                return table
            self._tables, self.pos, self.row = None, self.pos + 1, 0
        return None

    def take(self, n: int) -> list[Any]:
        """Up to n rows as a list of Arrow tables; advances (pos, row)."""
        out, have = [], 0
        while have < n:
            table = self._pending if self._pending is not None else self._next_table()
            self._pending = None
            if table is None:
                break
            need = n - have
            if table.num_rows > need:
                table, self._pending = table.slice(0, need), table.slice(need)
            out.append(table)
            have += table.num_rows
            self.row += table.num_rows
        return out


def stream_batches(
    source: TrajectorySource,
    cfg: LoaderConfig,
    epoch: int,
    stream: int,
    start: StreamPosition,
    max_token_id: int | None = None,
) -> Iterator[tuple[Examples, StreamPosition]]:
    """The batches of one stream in one epoch, from ``start``; each with the position after it.

    A pure function of (dataset, cfg, epoch, stream, start): the same arguments give the same
    batches, which is what makes resume exact.
    """
    import pyarrow as pa

    files = epoch_files(len(source.files), cfg.seed, epoch, stream, cfg.streams)
    reader = _RowReader(source, files, start.file, start.row, cfg.read_rows)
    window, offset = start.window, start.offset
    pending: list[Examples] = []
    have = 0
    while True:
        win_file, win_row = reader.pos, reader.row
        tables = reader.take(cfg.shuffle_buffer)
        if not tables:
            return
        rows = table_arrays(pa.concat_tables(tables), source.times)
        if max_token_id is not None and rows.states.size and rows.states.max() > max_token_id:
            bad = int(rows.ids[(rows.states > max_token_id).any(axis=(1, 2))][0])
            raise DataError(
                f"trajectory {bad} holds token id {int(rows.states.max())}, outside the "
                f"student's vocabulary (ids 0..{max_token_id}): the dataset was built with "
                "another vocabulary; use its teacher as --init"
            )
        keep = ~heldout_mask(rows.ids, cfg.heldout_fraction)
        order = np.flatnonzero(keep)
        rng = np.random.default_rng([cfg.seed, epoch, stream, window])
        order = order[rng.permutation(order.shape[0])]
        ex = trajectory_examples(source.times, rows.states[order], rows.ids[order])
        while offset < len(ex):
            take = min(cfg.batch_size - have, len(ex) - offset)
            pending.append(ex.take(slice(offset, offset + take)))
            offset += take
            have += take
            if have == cfg.batch_size:
                if offset < len(ex):
                    after = StreamPosition(win_file, win_row, window, offset)
                else:
                    after = StreamPosition(reader.pos, reader.row, window + 1, 0)
                yield Examples.concat(pending), after
                pending, have = [], 0
        window, offset = window + 1, 0


class _StreamWorkers(torch.utils.data.IterableDataset):
    """The DataLoader side: worker w runs the i-th of the ``active`` streams for i ≡ w (mod
    workers), round-robin, and yields (stream, kind, payload) items: ("batch", (ExampleBatch,
    position)), ("end", None) or ("error", message)."""

    def __init__(self, source, cfg, epoch, starts, active, workers, max_token_id):
        super().__init__()
        self.source, self.cfg, self.epoch, self.active = source, cfg, epoch, active
        self.starts, self.workers, self.max_token_id = starts, workers, max_token_id

    def __iter__(self):
        from tsdfm.models.errors import TsdfmError

        info = torch.utils.data.get_worker_info()
        w = 0 if info is None else info.id
        mine = [s for i, s in enumerate(self.active) if i % self.workers == w]
        gens = {
            s: stream_batches(
                self.source, self.cfg, self.epoch, s, self.starts[s], self.max_token_id
            )
            for s in mine
        }
        while gens:
            for s in list(gens):
                try:
                    ex, pos = next(gens[s])
                except StopIteration:
                    del gens[s]
                    yield s, "end", None
                    continue
                except TsdfmError as e:
                    yield s, "error", str(e)
                    return
                yield s, "batch", (ex.tensors(), replace(pos, epoch=self.epoch))


def _identity(item):
    return item


class TrajectoryLoader:
    """Infinite, resumable sequence of :class:`ExampleBatch` over epochs of a dataset.

    **Lanes** (data-parallel training): a job of W processes reads the P streams in W lanes,
    lane r owning the streams s ≡ r (mod W), so the processes read disjoint files. A lane
    takes batches from its own streams round-robin and moves to its next epoch when they are
    all done (its epoch is its own). With one lane this is the single-process order; while
    no stream has ended, W lanes give, step for step, the same batches as one lane with W
    times the accumulation (the same global batch).

    Args:
        source: the opened dataset.
        cfg: loader config.
        num_workers: DataLoader worker processes (0: read in this process); does not change
            the batch sequence.
        max_token_id: largest token id the student accepts (a larger one is a DataError).
        pin_memory: pin batches (for CUDA).
        lane, lanes: this loader is lane ``lane`` of ``lanes`` (``lanes`` must divide P).
    """

    def __init__(
        self,
        source: TrajectorySource,
        cfg: LoaderConfig,
        num_workers: int = 0,
        max_token_id: int | None = None,
        pin_memory: bool = False,
        lane: int = 0,
        lanes: int = 1,
    ):
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be ≥ 0")
        if cfg.streams % lanes:
            raise ConfigError(
                f"--streams {cfg.streams} cannot be split over {lanes} processes; pass a "
                f"multiple of {lanes} (each process reads streams of its own)"
            )
        assert 0 <= lane < lanes, (lane, lanes)
        self.source, self.cfg, self.lane, self.lanes = source, cfg, lane, lanes
        self.mine = list(range(lane, cfg.streams, lanes))  # this lane's streams
        self.num_workers = min(num_workers, len(self.mine))
        self.max_token_id = max_token_id
        self.pin_memory = pin_memory
        self.state = LoaderState(streams=[StreamPosition() for _ in range(cfg.streams)])
        self.resumed_lanes: int | None = None  # lanes of the state loaded, when it had others

    def state_dict(self) -> dict:
        """This lane's position (with several lanes, merge them: :func:`merge_lane_states`)."""
        return self.state.to_dict()

    def load_state_dict(self, d: dict) -> None:
        """Resume from a lane's or a job's (:func:`merge_lane_states`) position. A job
        position saved with another number of lanes keeps every stream's position (no batch
        of an epoch is read twice or skipped); the lanes' round-robin restarts."""
        state = LoaderState.from_dict(d)
        if len(state.streams) != self.cfg.streams:
            raise ConfigError(
                f"the saved data position has {len(state.streams)} streams, this run "
                f"{self.cfg.streams}; resume with the same --streams"
            )
        lanes = d.get("lanes")
        saved = 1 if lanes is None else len(lanes)
        if saved == self.lanes:
            if lanes is not None:
                lane = lanes[self.lane]
                state.epoch, state.pointer = int(lane["epoch"]), int(lane["pointer"])
                state.batches = int(lane["batches"])
        else:
            self.resumed_lanes = saved
            state.epoch = min(state.streams[s].epoch for s in self.mine)
            state.pointer = 0
        self.state = state

    def _epoch_items(self, starts: list[StreamPosition], active: list[int]):
        dataset = _StreamWorkers(
            self.source,
            self.cfg,
            self.state.epoch,
            starts,
            active,
            max(1, self.num_workers),
            self.max_token_id,
        )
        if self.num_workers == 0:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            pin_memory=self.pin_memory,  # the pin thread calls ExampleBatch.pin_memory()
            prefetch_factor=4,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[ExampleBatch]:
        mine, workers = self.mine, self.num_workers
        n = len(mine)
        while True:
            st = self.state
            e = st.epoch
            # streams of this epoch; a stream ahead (a resume on other lanes) waits for it
            live = {s for s in mine if st.streams[s].epoch == e and not st.streams[s].done}
            fresh = bool(live) and all(
                st.streams[s].file == 0 and st.streams[s].row == 0 for s in live
            )
            active = [s for s in mine if s in live]
            items = self._epoch_items([replace(p) for p in st.streams], active)
            queues: dict[int, deque] = {s: deque() for s in mine}
            produced = False
            try:
                while live:
                    s = mine[st.pointer]
                    if s not in live:
                        st.pointer = (st.pointer + 1) % n
                        continue
                    while not queues[s]:
                        got = next(items, None)
                        assert got is not None, f"stream {s} ended without its end marker"
                        if got[1] == "error":
                            raise DataError(got[2])
                        queues[got[0]].append(got)
                    _, kind, payload = queues[s].popleft()
                    st.pointer = (st.pointer + 1) % n
                    if kind == "end":
                        st.streams[s].done = True
                        live.discard(s)
                        continue
                    batch, pos = payload
                    st.streams[s] = pos
                    st.batches += 1
                    produced = True
                    yield batch.pin_memory() if self.pin_memory and not workers else batch
            finally:
                del items
            if not produced and fresh:
                raise DataError(
                    f"an epoch of dataset {self.source.ref} gives no full batch of "
                    f"{self.cfg.batch_size} examples per stream: lower --batch-size or --streams"
                )
            streams = list(st.streams)
            for s in mine:
                if streams[s].epoch == e:
                    streams[s] = StreamPosition(epoch=e + 1)
            self.state = LoaderState(
                epoch=min(streams[s].epoch for s in mine),
                pointer=0,
                batches=st.batches,
                streams=streams,
            )

    def heldout(self, max_trajectories: int) -> Examples | None:
        """Every segment of the first ``max_trajectories`` held-out trajectories (in file
        order), or None when the split is empty."""
        if self.cfg.heldout_fraction <= 0 or max_trajectories < 1:
            return None
        parts, found = [], 0
        for index in range(len(self.source.files)):
            for table in self.source.iter_tables(index, 256):
                rows = table_arrays(table, self.source.times)
                sel = np.flatnonzero(heldout_mask(rows.ids, self.cfg.heldout_fraction))
                sel = sel[: max_trajectories - found]
                if sel.size:
                    parts.append(
                        trajectory_examples(self.source.times, rows.states[sel], rows.ids[sel])
                    )
                    found += sel.size
                if found >= max_trajectories:
                    return Examples.concat(parts)
        return Examples.concat(parts) if parts else None
