"""``tsdfm-pipeline convert``: a schema v1 dataset rewritten as schema v2, shard by shard.

Every shard of the source is read, decoded by the one decoder (``decode_rows``) and encoded
again by the one encoder (``encode_rows`` through ``transcode``) in schema v2, then written
by the shard writer (``write_shard``: temp file, rename, the row invariants checked). The
decoded states are the same bit for bit; energies are rounded to float16, as a v2 build
rounds them. The recorded config becomes the config a v2 build of the same dataset would
record (``schema_version: 2``, ``text``), so the manifest's fingerprint is that build's
fingerprint and a converted shard has the bytes a native v2 build writes (``verify
--replay`` passes on it).

The destination follows the build's bookkeeping: ``manifest.json`` is created first and
records each shard only once its file is committed, and the card (``README.md``) is written
last, so an interrupted conversion is a folder with shards missing (``verify`` says so) and a
rerun of the same command resumes it. The source is only read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tsdfm.models import __version__
from tsdfm.models.data.schema import shard_schema, transcode
from tsdfm.models.errors import ConfigError, DataError
from tsdfm.models.hashing import file_sha256
from tsdfm.pipeline.card import CARD_FILE, read_card, write_card
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.lock import LOCK_FILE, BuildLock
from tsdfm.pipeline.manifest import MANIFEST_FILE, Manifest
from tsdfm.pipeline.shards import (
    DATA_DIR,
    ShardInfo,
    cleanup_temp,
    read_footer,
    shard_name,
    write_shard,
)

TARGET_VERSION = 2
READ_ROWS = 1024  # rows decoded and encoded at a time (memory stays a few batches)


@dataclass(frozen=True)
class ConvertSummary:
    """What :func:`convert` did.

    Attributes:
        src, dst: the folders.
        fingerprint: the converted dataset's fingerprint (a v2 build's of the same config).
        converted: shard indices written by this run.
        skipped: shard indices already converted by an earlier run (resumed).
        rows: rows in the converted dataset.
        src_bytes, dst_bytes: total shard bytes before and after.
        text: whether the converted shards keep the text column.
    """

    src: str
    dst: str
    fingerprint: str
    converted: list[int]
    skipped: list[int]
    rows: int
    src_bytes: int
    dst_bytes: int
    text: bool


def _local_folder(path: str, what: str) -> Path:
    if "://" in str(path):
        raise ConfigError(
            f"{what} {path}: convert reads and writes local folders; copy the dataset here first"
        )
    return Path(path).expanduser().resolve()


def _source(src: Path) -> Manifest:
    """The source's manifest, when it is a finished schema v1 dataset; else one line."""
    if not src.is_dir():
        raise DataError(
            f"{src} is not a folder; pass the v1 dataset folder that holds manifest.json"
        )
    if not (src / MANIFEST_FILE).exists():
        raise DataError(
            f"{src} has no {MANIFEST_FILE}: it is not a tsdfm trajectory dataset (or its build "
            "never started); pass a dataset folder built by `tsdfm-pipeline build`"
        )
    manifest = Manifest.load(str(src))  # an unknown schema version is refused here
    version = manifest.to_dict()["schema_version"]
    config_version = (manifest.plan.get("config") or {}).get("schema_version", 1)
    if version == TARGET_VERSION or config_version == TARGET_VERSION:
        raise DataError(
            f"{src} is already trajectory schema v{TARGET_VERSION}: there is nothing to convert "
            "(`tsdfm-pipeline verify` checks it)"
        )
    if version != 1 or config_version != 1:
        raise DataError(
            f"{src} records schema v{version} (config v{config_version}); convert turns v1 "
            "into v2 only"
        )
    missing = manifest.missing()
    if missing:
        raise DataError(
            f"{src} is not finished: shards {missing[:5]}{'…' if len(missing) > 5 else ''} are "
            "not committed; rerun its build to finish it, then convert"
        )
    return manifest


def _keeps_text(src: Path, manifest: Manifest, text: bool | None) -> bool:
    """Whether v2 keeps the text column: as asked, else when the v1 shards hold text."""
    name = shard_name(0, manifest.num_shards)
    try:
        column = pq.read_table(src / name, columns=["text"]).column("text")
    except (OSError, KeyError, pa.ArrowException) as e:
        raise DataError(
            f"{src / name} does not read as a v1 shard ({str(e).splitlines()[0]}); "
            "`tsdfm-pipeline verify` the source and rebuild that shard"
        ) from None
    has_text = column.null_count < len(column)
    if text is True and not has_text:
        raise DataError(
            f"{src} stores no text (its teacher has no tokenizer, or it was built with text "
            "off): convert it without --text"
        )
    return has_text if text is None else text


def _check_overlap(src: Path, dst: Path) -> None:
    if dst == src or src in dst.parents or dst in src.parents:
        raise ConfigError(
            f"--out {dst} overlaps the source {src}: pass a folder outside it (the source is "
            "kept as it is)"
        )


def _destination(dst: Path, fingerprint: str) -> Manifest | None:
    """DST's manifest when it holds this very conversion (resume), None when it is new or
    empty; anything else is refused."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"--out {dst} is a file; pass a new or empty folder")
    entries = sorted(p.name for p in dst.iterdir() if p.name != LOCK_FILE) if dst.exists() else []
    if (dst / MANIFEST_FILE).exists():
        manifest = Manifest.load(str(dst))
        if manifest.fingerprint != fingerprint:
            raise ConfigError(
                f"--out {dst} holds another dataset (fingerprint {manifest.fingerprint}, this "
                f"conversion gives {fingerprint}): pass a new or empty folder"
            )
        return manifest
    if entries:
        raise ConfigError(
            f"--out {dst} is not empty ({', '.join(entries[:3])}); pass a new or empty folder"
        )
    return None


def _identities(src: Path, manifest: Manifest) -> dict[str, Any]:
    """The checkpoint identities the source's shards record (shard 0's footer)."""
    meta = read_footer(str(src), shard_name(0, manifest.num_shards)).tsdfm()
    return {k: meta.get(k) for k in ("teacher_identity", "compass_identity")}


def _source_rows(path: Path, index: int, meta: dict[str, Any], text: bool) -> Iterator[pa.Table]:
    """The rows of one v1 shard, re-encoded in v2 a batch at a time."""
    pf = pq.ParquetFile(path)
    if pf.schema_arrow.remove_metadata() != shard_schema(meta):
        raise DataError(
            f"{path}: its columns are not those of trajectory schema v1 (altered or "
            "mislabelled); verify the source and rebuild that shard"
        )
    for batch in pf.iter_batches(batch_size=READ_ROWS):
        try:
            yield transcode(batch, TARGET_VERSION, text)
        except DataError as e:
            raise DataError(
                f"shard {index} of the source cannot be stored in schema v2 ({e}); keep that "
                "dataset in v1"
            ) from None


def _convert_shard(
    src: Path, index: int, manifest: Manifest, dst: Path, meta_v2: dict[str, Any], text: bool
) -> tuple[ShardInfo, dict[str, Any]]:
    """Check source shard ``index`` against its manifest entry, write its v2 form to DST."""
    name = shard_name(index, manifest.num_shards)
    path = src / name
    entry = manifest.shard(index)
    assert entry is not None
    if not path.exists():
        raise DataError(f"{path} is missing: restore it or rebuild the source, then convert")
    if path.stat().st_size != entry["bytes"] or file_sha256(str(path)) != entry["sha256"]:
        raise DataError(
            f"{path} is not the file its manifest records (size or sha256 differ): the source "
            "was altered; `tsdfm-pipeline verify` it and rebuild that shard"
        )
    meta = read_footer(str(src), name).tsdfm()
    if meta.get("fingerprint") != manifest.fingerprint or meta.get("shard") != index:
        raise DataError(
            f"{path} carries the metadata of another dataset or shard; verify the source"
        )
    info = write_shard(
        str(dst),
        index,
        manifest.num_shards,
        _source_rows(path, index, meta, text),
        {**meta, **meta_v2, "shard": index},
    )
    if info.rows != entry["rows"]:
        raise DataError(f"{path} gave {info.rows} rows, its manifest records {entry['rows']}")
    return info, entry


def convert(
    src: str,
    dst: str,
    *,
    text: bool | None = None,
    say: Callable[[str], None] | None = None,
) -> ConvertSummary:
    """Convert the schema v1 dataset at ``src`` into schema v2 at ``dst`` (or resume that).

    Args:
        src: a finished v1 dataset folder (every shard recorded); only read.
        dst: a new or empty folder, or a folder an earlier run of the same conversion began.
        text: keep v2's optional text column (True), drop it (False); None keeps it when the
            v1 shards store text.
        say: hears one line per shard.

    Raises:
        DataError, ConfigError: one line naming the problem and the fix; nothing is written
            before the source and the destination are checked.
    """
    say = say or (lambda line: None)
    src_path, dst_path = _local_folder(src, "SRC"), _local_folder(dst, "--out")
    manifest = _source(src_path)
    keep_text = _keeps_text(src_path, manifest, text)
    cfg = BuildConfig.from_dict(manifest.plan["config"])
    # the config a native v2 build of this dataset records: text True, or absent (v2's default)
    cfg_v2 = replace(cfg, schema_version=TARGET_VERSION, text=True if keep_text else None)
    ids = _identities(src_path, manifest)
    fingerprint = cfg_v2.fingerprint(ids["teacher_identity"], ids["compass_identity"])
    plan = {**manifest.plan, "config": cfg_v2.to_dict()}
    card = read_card(str(src_path)) if (src_path / CARD_FILE).exists() else None
    date = (card[0].get("tsdfm") or {}).get("build_date") if card else None
    build_date = str(date) if date else None
    _check_overlap(src_path, dst_path)  # before the lock creates anything
    with BuildLock(str(dst_path)):
        out = _destination(dst_path, fingerprint)
        new = out is None
        if out is None:
            (dst_path / DATA_DIR).mkdir(parents=True, exist_ok=True)
            out = Manifest.create(str(dst_path), plan, fingerprint, manifest.tokenizer_identity)
        else:
            out.check_plan(plan)
        cleanup_temp(str(dst_path))  # this run holds the lock: temp files are a dead run's
        todo, done, corrupt = out.status()
        for index in corrupt:
            out.forget(index)
        meta_v2 = {
            "schema_version": TARGET_VERSION,
            "package_version": __version__,
            "config": cfg_v2.to_dict(),
            "fingerprint": fingerprint,
        }
        try:
            for index in todo:
                info, entry = _convert_shard(
                    src_path, index, manifest, dst_path, meta_v2, keep_text
                )
                out.record_shard(info, entry.get("counters"), entry.get("stats"))
                say(f"{info.path}: {entry['bytes']:,} → {info.bytes:,} bytes")
        except BaseException:
            if new and not out.committed():  # nothing converted: leave the folder as it was
                _undo_new(dst_path)
            raise
        write_card(str(dst_path), build_date=build_date, manifest=out)
        totals = out.totals()
    return ConvertSummary(
        src=str(src_path),
        dst=str(dst_path),
        fingerprint=fingerprint,
        converted=todo,
        skipped=done,
        rows=totals["rows"],
        src_bytes=manifest.totals()["bytes"],
        dst_bytes=totals["bytes"],
        text=keep_text,
    )


def _undo_new(dst: Path) -> None:
    """Remove what a new conversion wrote before its first shard: manifest.json, empty data/."""
    with contextlib.suppress(OSError):
        (dst / MANIFEST_FILE).unlink()
        (dst / DATA_DIR).rmdir()
