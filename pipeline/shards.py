"""Shard files: deterministic names, deterministic bytes, temp-file-then-rename commits.

A shard is ``data/train-{i:05d}-of-{n:05d}.parquet`` under the dataset root, which is a local
path or any fsspec URL (``s3://bucket/ds``, ``gs://…``, ``memory://…``). It is written to a
hidden temporary name in the same folder (``.train-00003-of-00008.parquet.tmp-<unique>``) and
renamed to its final name only once complete, so a reader never sees a partial shard under the
final name. On a local filesystem the rename is atomic (``os.replace``) and the bytes are
fsynced first; on object stores fsspec's rename is a copy + delete, which is not atomic but
still never exposes a partial object under the final key (the copy is server-side and whole).

The same rows and metadata give a byte-identical file: row groups have a fixed number of rows
(not tied to how the rows were batched), and Parquet records no timestamps; only the writer
version (``created_by``) is embedded, so the bytes depend on the pyarrow version.

Parquet options (docs/schema.md): zstd, content-defined chunking, a page index, row groups of
about 100 MB in memory (the Hub's guidance; v1 files keep their ≤ 32 MB groups), dictionary
encoding for every column but v2's float16 energies (their values are nearly all distinct, so
a dictionary page plus 16-bit indices cost more than the values: plain + zstd keeps them at
their 16 bits; v1 files keep the dictionary, so their bytes do not change), file-level
key-value metadata ``tsdfm`` = canonical JSON of the shard's metadata (never the key
``huggingface``). The shard's schema version and text column follow its metadata
(``tsdfm.models.data.schema.shard_schema``).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tsdfm.models.data.integrity import RowRules
from tsdfm.models.data.schema import (
    METADATA_KEY,
    SCHEMA_VERSION,
    MetadataError,
    ShardFooter,
    TrajectoryBatch,
    TrajectoryRows,
    batch_rows,
    check_schema_version,
    decode_metadata,
    decode_rows,
    parquet_footer,
    shard_is,
    shard_schema,
    to_arrow,
)
from tsdfm.models.errors import DataError, ShardError
from tsdfm.models.hashing import canonical_json, file_sha256

DATA_DIR = "data"
MAX_SHARDS = 99_999
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3
ROW_GROUP_TARGET_BYTES = 32 * 2**20  # v1: uncompressed estimate; compressed groups are smaller
MAX_ROW_GROUP_ROWS = 65_536  # v1
# v2: the Hub's guidance, 100-300 MB per row group in memory (the dataset viewer reads whole
# groups and refuses more than 286 MiB); the estimate is the Arrow size of the first row
ROW_GROUP_MEMORY_BYTES = 100 * 10**6
MAX_ROW_GROUP_ROWS_V2 = 2**20
_TEMP = re.compile(r"^\..+\.tmp-[0-9a-f]+$")


@dataclass(frozen=True)
class ShardInfo:
    """A committed shard.

    Attributes:
        index: shard index i.
        path: path relative to the dataset root, ``data/train-{i:05d}-of-{n:05d}.parquet``.
        rows: number of trajectories.
        bytes: file size.
        sha256: hex digest of the file's bytes.
    """

    index: int
    path: str
    rows: int
    bytes: int
    sha256: str

    def __post_init__(self) -> None:
        if self.index < 0 or self.rows < 0 or self.bytes <= 0:
            raise ShardError(f"invalid ShardInfo {self}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ShardError(f"ShardInfo.sha256 {self.sha256!r} is not a sha256 hex digest")


def shard_name(i: int, n: int) -> str:
    """``data/train-{i:05d}-of-{n:05d}.parquet``, the Hub's split-file naming."""
    if not 1 <= n <= MAX_SHARDS:
        raise ShardError(f"number of shards {n} is outside [1, {MAX_SHARDS}]")
    if not 0 <= i < n:
        raise ShardError(f"shard index {i} is outside [0, {n})")
    return f"{DATA_DIR}/train-{i:05d}-of-{n:05d}.parquet"


def open_root(root: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) of a dataset root given as a path or fsspec URL."""
    try:
        fs, path = fsspec.core.url_to_fs(str(root))
    except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
        raise ShardError(
            f"{root}: this URL's filesystem is not installed ({e}); pip install it, or use a "
            "local folder"
        ) from None
    except ValueError as e:  # "Protocol not known: foo"
        raise ShardError(
            f"{root}: {e}; use a local folder or an fsspec URL (s3://, gs://, az://, ...)"
        ) from None
    return fs, path.rstrip("/") or "/"


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}"


def _temp_path(final: str) -> str:
    folder, _, base = final.rpartition("/")
    return f"{folder}/.{base}.tmp-{uuid.uuid4().hex[:16]}"


def _commit(fs: fsspec.AbstractFileSystem, tmp: str, final: str) -> None:
    """Rename tmp → final (atomic on local disks; copy + delete on object stores)."""
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, final)
        fd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
    else:
        fs.mv(tmp, final)


def _remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    try:
        if fs.exists(path):
            fs.rm(path)
    except OSError:
        pass  # best effort: cleanup_temp removes leftovers on the next run


def atomic_write(fs: fsspec.AbstractFileSystem, final: str, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``final``, then rename it to ``final``.

    On any error the temp file is removed and ``final`` is left as it was.
    """
    folder = final.rpartition("/")[0]
    fs.makedirs(folder, exist_ok=True)
    tmp = _temp_path(final)
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
            f.flush()
            if isinstance(fs, LocalFileSystem):
                os.fsync(f.fileno())
        _commit(fs, tmp, final)
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


# v2 columns stored without a dictionary (plain encoding + zstd), see the module docstring
PLAIN_COLUMNS_V2 = ("energies",)


def leaf_path(field: pa.Field) -> str:
    """The Parquet path of a field's leaf column (``energies.list.element.list.element``)."""
    path, typ = field.name, field.type
    while pa.types.is_list(typ):
        path, typ = f"{path}.list.{typ.value_field.name}", typ.value_type
    return path


def dictionary_columns(schema: pa.Schema, version: int) -> bool | list[str]:
    """pyarrow's ``use_dictionary`` for a shard: all columns in v1, all but
    :data:`PLAIN_COLUMNS_V2` in v2 (leaf paths, as Parquet names them)."""
    if version == 1:
        return True
    return [leaf_path(f) for f in schema if f.name not in PLAIN_COLUMNS_V2]


def default_row_group_rows(first: pa.Table) -> int:
    """Rows per row group from the row shape of the shard (S, L, K), not from its content.

    The estimate counts the fixed-size columns twice (a margin for the text column) so that a
    group stays under ROW_GROUP_TARGET_BYTES uncompressed, far below the 100 MB Hub limit.
    """
    row = first.slice(0, 1).to_pylist()[0]
    fixed = 8 + 4 + 8 + 4 * len(row["times"]) + 2 * len(row["chosen"])
    fixed += 4 * sum(len(s) for s in row["states"]) + 4 * sum(len(e) for e in row["energies"])
    return max(1, min(MAX_ROW_GROUP_ROWS, ROW_GROUP_TARGET_BYTES // (2 * fixed)))


def memory_row_group_rows(first: pa.Table) -> int:
    """Rows per v2 row group: about :data:`ROW_GROUP_MEMORY_BYTES` of Arrow memory, from the
    in-memory size of the first row (so the file depends on the rows, not on their batching)."""
    per_row = max(1, first.slice(0, 1).nbytes)  # a slice counts only its own values
    return max(1, min(MAX_ROW_GROUP_ROWS_V2, ROW_GROUP_MEMORY_BYTES // per_row))


def _as_table(
    item: TrajectoryBatch | pa.Table | pa.RecordBatch, index: int, schema: pa.Schema, version: int
) -> tuple[pa.Table, TrajectoryRows]:
    """The rows as a table of the shard's schema, and decoded (for the row invariants)."""
    if isinstance(item, TrajectoryBatch):
        record = to_arrow(item, version, "text" in schema.names)
        table, rows = pa.Table.from_batches([record]), batch_rows(item)
        if version == 2:
            rows = replace(rows, energies=rows.energies.astype(np.float16).astype(np.float32))
    elif isinstance(item, (pa.Table, pa.RecordBatch)):
        table = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
        if not table.schema.equals(schema):
            raise ShardError(
                f"rows for shard {index} do not have the shard's trajectory schema "
                f"v{version}{'' if 'text' in schema.names else ' (without text)'}; build them "
                "with tsdfm.models.data.schema.to_arrow"
            )
        try:
            rows = decode_rows(table)
        except DataError as e:
            raise ShardError(f"rows for shard {index}: {e}; {_WRITER_FIX}") from None
    else:
        raise ShardError(
            f"write_shard takes TrajectoryBatch or pyarrow tables, got {type(item).__name__}"
        )
    bad = shard_is(rows.shard, index)
    if bad.any():
        others = sorted(set(rows.shard[bad].tolist()))
        raise ShardError(f"rows of shard {index} carry other shard indices {others[:5]}")
    return table.replace_schema_metadata(None), rows


_WRITER_FIX = (
    "nothing was committed; fix what produced the rows (the contract's invariants are the "
    "predicates of tsdfm.models.data.schema)"
)


def _check_rows(rules: RowRules, rows: TrajectoryRows, index: int, start: int) -> None:
    """The contract's row invariants on rows ``start``… of shard ``index``, before they are
    written: a ShardError naming the shard, the row and the fix."""
    broken = rules.broken(rows, start=start)
    if broken is not None:
        r, what = broken
        raise ShardError(
            f"shard {index}, row {start + r} (trajectory_id {int(rows.ids[r])}), breaks the "
            f"dataset contract ('{what}'): {_WRITER_FIX}"
        )


def write_shard(
    root: str,
    index: int,
    num_shards: int,
    batches: Iterable[TrajectoryBatch | pa.Table | pa.RecordBatch],
    metadata: dict[str, Any],
    *,
    row_group_rows: int | None = None,
) -> ShardInfo:
    """Write shard ``index`` of ``num_shards`` under ``root`` and commit it by rename.

    Rows are buffered and written in row groups of exactly ``row_group_rows`` rows (the last
    one shorter), so the file depends only on the rows, not on how they were batched.

    Args:
        root: dataset root, a local path or fsspec URL.
        index, num_shards: the shard's place in the plan.
        batches: the rows in order, as TrajectoryBatch or tables of the trajectory schema.
        metadata: JSON object stored as file metadata ``tsdfm``; ``schema_version`` (default
            :data:`SCHEMA_VERSION`), ``shard`` and ``num_shards`` are added when absent. The
            version and the config's ``text`` decide the file's schema (``shard_schema``).
        row_group_rows: rows per row group; default ~100 MB in memory per group (v2; v1: from
            the row shape, ≤ 32 MB).

    Returns:
        ShardInfo with the relative path, row count, size and sha256 of the committed file.
    """
    name = shard_name(index, num_shards)
    if row_group_rows is not None and row_group_rows < 1:
        raise ShardError(f"row_group_rows must be ≥ 1, got {row_group_rows}")
    if not isinstance(metadata, dict):
        raise ShardError(f"shard metadata must be a dict, got {type(metadata).__name__}")
    version = metadata.get("schema_version", SCHEMA_VERSION)
    meta = {"schema_version": version, "shard": index, "num_shards": num_shards}
    for key, value in meta.items():
        if key in metadata and metadata[key] != value:
            raise ShardError(f"shard metadata says {key}={metadata[key]!r}, the shard is {value}")
    payload = canonical_json({**metadata, **meta})
    config = metadata.get("config")
    rules = RowRules.from_config(config if isinstance(config, dict) else {}, shard=index)
    try:
        schema = shard_schema({**metadata, **meta})
    except DataError as e:
        raise ShardError(f"shard {index}: {e}") from None
    fs, base = open_root(root)
    final = _join(base, name)
    rows = 0

    def write(f) -> None:
        nonlocal rows
        with pq.ParquetWriter(
            f,
            schema,
            compression=COMPRESSION,
            compression_level=COMPRESSION_LEVEL,
            use_content_defined_chunking=True,
            write_page_index=True,
            use_dictionary=dictionary_columns(schema, version),
        ) as writer:
            group = row_group_rows
            pending: list[pa.Table] = []
            buffered = 0
            for item in batches:
                table, decoded = _as_table(item, index, schema, version)
                if not table.num_rows:
                    continue
                _check_rows(rules, decoded, index, rows + buffered)
                group = group or (
                    default_row_group_rows(table) if version == 1 else memory_row_group_rows(table)
                )
                pending.append(table)
                buffered += table.num_rows
                while buffered >= group:
                    full = pa.concat_tables(pending)
                    # one contiguous chunk per column: page and CDC boundaries then depend
                    # on the rows only, not on how the caller batched them
                    writer.write_table(full.slice(0, group).combine_chunks(), group)
                    rest = full.slice(group)
                    pending, buffered = [rest], rest.num_rows
                    rows += group
            if buffered:
                writer.write_table(pa.concat_tables(pending).combine_chunks(), buffered)
                rows += buffered
            writer.add_key_value_metadata({METADATA_KEY.decode(): payload.decode()})

    atomic_write(fs, final, write)
    return ShardInfo(index, name, rows, fs.size(final), file_sha256(final, fs))


def read_footer(root: str, name: str) -> ShardFooter:
    """The footer of the shard ``root/name`` (``tsdfm.models.data.schema.parquet_footer``);
    ShardError when the file is missing or not Parquet. Reads only the footer."""
    fs, base = open_root(root)
    path = _join(base, name)
    try:
        with fs.open(path, "rb") as f:
            return parquet_footer(f)
    except FileNotFoundError:
        raise ShardError(f"shard {path} does not exist: rerun the build to (re)write it") from None
    except DataError as e:  # not Parquet
        raise ShardError(f"{path} {e}: rebuild it") from None


def read_shard(root: str, name: str) -> tuple[pa.Table, dict[str, Any]]:
    """(rows, ``tsdfm`` metadata) of the shard at ``root/name``; the table has no metadata.

    The footer is read by :func:`read_footer`, the metadata by the one reader
    (``decode_metadata``, unknown keys accepted), and its schema version must be this one's.
    """
    footer = read_footer(root, name)
    fs, base = open_root(root)
    path = _join(base, name)
    try:
        meta = footer.tsdfm()
        check_schema_version(meta)
        if footer.schema != shard_schema(meta):
            raise DataError(
                f"its columns {footer.schema.names} are not those of trajectory schema "
                f"v{meta['schema_version']} (altered or mislabelled)"
            )
    except DataError as e:
        raise ShardError(f"{path}: {e}; rebuild it") from None
    try:
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read()
    except (pa.ArrowInvalid, OSError) as e:
        raise ShardError(f"{path}: the data pages do not decode ({e}): rebuild it") from None
    return table.replace_schema_metadata(None), meta


def parse_metadata(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(the ``tsdfm`` metadata object, None) or (None, what is wrong with it): the one reader
    ``tsdfm.models.data.schema.decode_metadata`` (lenient about unknown keys), as a pair."""
    try:
        return decode_metadata(raw, strict=False), None
    except MetadataError as e:
        return None, str(e)


def is_temp(name: str) -> bool:
    """True for the name of a writer's temp file (``.train-….parquet.tmp-<hex>``)."""
    return _TEMP.match(name) is not None


def cleanup_temp(root: str) -> list[str]:
    """Remove temp files left by crashed writers under ``root`` and ``root/data``.

    Call it at the start of a build, before any writer runs: a live writer's temp file
    matches too. Returns the removed paths.
    """
    fs, base = open_root(root)
    removed = []
    for folder in (base, _join(base, DATA_DIR)):
        if not fs.isdir(folder):
            continue
        for path in fs.ls(folder, detail=False):
            if _TEMP.match(path.rstrip("/").rpartition("/")[2]):
                fs.rm(path)
                removed.append(path)
    return sorted(removed)
