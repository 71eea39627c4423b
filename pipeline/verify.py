"""``tsdfm-pipeline verify``: check a trajectory dataset against its contract; report every problem.

A dataset passes when, for the folder (or Hub revision) as a whole:

- ``manifest.json`` is valid, records every planned shard, and its totals, plan and fingerprint
  agree with the recorded config and the checkpoint identities in the shards;
- ``data/`` holds exactly the planned shard files (a stray ``train-*`` file would be read as
  part of the split);
- every shard has the recorded size and sha256, is readable Parquet with the exact trajectory
  schema, the recorded number of rows, row groups under 100 MB, and ``tsdfm`` metadata that
  agrees with the manifest (schema version, shard index, fingerprint, config, package version,
  shard seed, the same identities in every shard);
- every row keeps the invariants of the algorithm (docs/schema.md): trajectory_id = shard ·
  rows_per_shard + row, seed = dataset seed · 2^32 + trajectory_id, times strictly increasing
  from t_0 = 0 to t_S = 1, S and L as planned, energies finite with K values exactly in the
  shaped segments, chosen < K (0 where not shaped), token ids in [0, V) (the [MASK] id V also
  allowed before t = 1 under the mask source), and under the mask source: x_0 all [MASK], a
  revealed position never changes again (revealed once, never re-masked), no [MASK] at t = 1;
- the card (``README.md``), if present, agrees with the manifest and the schema;
- with ``replay``: the chosen shards, rebuilt from the recorded config and checkpoints, have
  the recorded bytes.

Problems are collected, not raised: the report lists all of them. A target that is not a
trajectory dataset at all raises DataError.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tsdfm.models.data.integrity import RowRules
from tsdfm.models.data.schema import (
    RowError,
    ShardFooter,
    decode_rows,
    infer_mask_token,
    stores_text,
    text_all_or_none,
    trajectory_schema,
)
from tsdfm.models.errors import ConfigError, DataError, PathError, TsdfmError
from tsdfm.models.hashing import file_sha256
from tsdfm.models.paths import confined
from tsdfm.models.refs import parse_hub_ref
from tsdfm.models.rng import trajectory_seed
from tsdfm.pipeline.card import CARD_FILE, DATA_FILES, features_yaml, read_card
from tsdfm.pipeline.manifest import FORMAT, MANIFEST_FILE, MISSING, Manifest
from tsdfm.pipeline.shards import DATA_DIR, is_temp, open_root, read_footer, shard_name

MAX_ROW_GROUP_BYTES = 100 * 2**20
_SHOW = 5  # rows named per broken invariant


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset: where (a file, or a part) and what."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        target: what was verified (folder, or org/name@rev).
        problems: every problem found (empty when the dataset passes).
        notes: facts about what could not be checked, not failures.
        shards_checked: shard indices whose rows were checked.
        rows_checked: rows whose invariants were checked.
        replayed: shard indices rebuilt and compared byte for byte.
    """

    target: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards_checked: list[int] = field(default_factory=list)
    rows_checked: int = 0
    replayed: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str) -> None:
        self.problems.append(Problem(where, " ".join(what.split())))

    def format(self) -> str:
        head = (
            f"{self.target}: {len(self.shards_checked)} shard(s), {self.rows_checked} row(s) "
            "checked"
            + (f", {len(self.replayed)} replayed {self.replayed}" if self.replayed else "")
        )
        lines = [head]
        lines += [f"note: {n}" for n in self.notes]
        if self.ok:
            lines.append("OK: no problems found")
        else:
            lines.append(f"FAILED: {len(self.problems)} problem(s)")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Plan:
    """What the rows must look like, from the manifest (or, without one, the shard metadata)."""

    num_shards: int
    rows_per_shard: int
    config: dict[str, Any]
    fingerprint: str | None
    package_version: str | None
    solver: dict[str, Any] | None = None  # an adapter teacher's vocabulary (manifest teacher)

    @property
    def nav(self) -> dict[str, Any]:
        return self.config.get("navigator", {})

    @property
    def schema_version(self) -> int:
        """The dataset's schema version: recorded in its config from v2 on (absent: v1)."""
        return self.config.get("schema_version", 1)

    @property
    def stores_text(self) -> bool:
        return stores_text({"schema_version": self.schema_version, "config": self.config})

    def schema(self) -> pa.Schema:
        """The Arrow schema every shard must have (the version's, with or without text)."""
        return trajectory_schema(self.schema_version, self.stores_text)


@dataclass
class _Vocab:
    """Token-id ranges: V data tokens, the [MASK] id under the mask source, L."""

    vocab_size: int | None
    mask_token_id: int | None
    seq_len: int | None
    source: str | None
    origin: str


# targets -------------------------------------------------------------------------------------


def parse_target(target: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when ``target`` names a Hub dataset, None for a local path."""
    if Path(target).expanduser().exists() or "://" in target:
        return None
    ref = parse_hub_ref(target)
    return None if ref is None else (ref.repo_id, ref.revision)


def download(repo_id: str, revision: str | None, token: str | None = None) -> str:
    """Download a Hub dataset revision (card, manifest, shards) and return the local folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=[CARD_FILE, MANIFEST_FILE, f"{DATA_DIR}/*"],
            token=token,
        )
    except RevisionNotFoundError:
        raise DataError(
            f"Hub dataset {repo_id} has no revision {revision!r}: pin a published version tag "
            "(v1, v2, …) or a commit"
        ) from None
    except RepositoryNotFoundError:
        raise DataError(
            f"Hub dataset {repo_id} not found or not accessible: check the id, and set HF_TOKEN "
            "(or run `hf auth login`) if it is private"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not download {repo_id}@{revision or 'main'} ({what}); check the revision "
            "(e.g. v1), the network or HF_ENDPOINT"
        ) from None


def verify(
    target: str,
    replay: int = 0,
    replay_shards: Sequence[int] | None = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    teacher: str | None = None,
    compass: str | None = None,
    token: str | None = None,
) -> VerifyReport:
    """Verify a dataset folder, fsspec URL or Hub dataset ``org/name[@rev]``.

    Args:
        target: local folder / URL, or Hub repo id with an optional revision.
        replay: rebuild this many shards, chosen at random (``seed``), and compare bytes.
        replay_shards: rebuild these shards instead.
        seed: seed of the random choice of replayed shards.
        device: where replayed shards are built.
        teacher, compass: checkpoints to replay with, when the recorded ones have moved (their
            identities must match the recorded ones).
        token: Hub token for private repos (default: HF_TOKEN or the HF login).
    """
    hub = parse_target(target)
    root = target if hub is None else download(hub[0], hub[1], token)
    # a Hub snapshot's files are links into its repo's blob store (snapshots/<sha>/… → blobs/…)
    within = None if hub is None else str(Path(root).parent.parent)
    report = verify_folder(
        root,
        replay,
        replay_shards,
        seed=seed,
        device=device,
        teacher=teacher,
        compass=compass,
        links_within=within,
    )
    if hub is not None:
        report.target = f"{hub[0]}@{hub[1] or 'main'}"
    return report


# the folder ----------------------------------------------------------------------------------


def _is_dataset(root: str) -> bool:
    fs, base = open_root(root)
    if fs.exists(f"{base}/{MANIFEST_FILE}"):
        return True
    data = f"{base}/{DATA_DIR}"
    return fs.isdir(data) and any(p.endswith(".parquet") for p in fs.ls(data, detail=False))


def verify_folder(
    root: str,
    replay: int = 0,
    replay_shards: Sequence[int] | None = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    teacher: str | None = None,
    compass: str | None = None,
    links_within: str | None = None,
) -> VerifyReport:
    """Verify the dataset at ``root`` (local path or fsspec URL); see the module docstring.

    ``links_within``: the folder that the files' links may point into (default ``root``
    itself); a Hub snapshot links its files into its repo's blob store, so :func:`verify`
    passes the repo's cache folder. Paths read from the manifest and the card are confined by
    ``tsdfm.models.paths.confined``.
    """
    root = str(root)
    fs, base = open_root(root)
    if not fs.exists(base):
        raise DataError(f"{root} does not exist; pass a dataset folder or org/name[@rev]")
    if not fs.isdir(base):
        raise DataError(f"{root} is a file; pass the dataset folder that holds manifest.json")
    if not _is_dataset(root):
        raise DataError(
            f"{root} is not a tsdfm trajectory dataset: it has no {MANIFEST_FILE} and no "
            f"{DATA_DIR}/*.parquet (build one with `tsdfm-pipeline build`)"
        )
    report = VerifyReport(target=root)
    manifest = _load_manifest(root, report)
    names = _data_files(root)
    plan = _plan(manifest, root, names, report)
    if plan is None:
        return report
    if manifest is not None:
        _check_manifest(root, manifest, plan, report, links_within)
    expected = [shard_name(i, plan.num_shards) for i in range(plan.num_shards)]
    for name in sorted(set(names) - set(expected)):
        if is_temp(name.rpartition("/")[2]):
            report.add(
                name,
                "temp file of a shard writer that died (killed or out of disk) before it "
                "finished: rerun the same build command (it removes leftovers) or delete it",
            )
            continue
        report.add(
            name,
            "unexpected file in data/: it does not belong to the plan of "
            f"{plan.num_shards} shards"
            + (" and would be read as part of the train split" if _in_split(name) else "")
            + "; remove it",
        )
    card = _load_card(root, report)
    vocab = _vocab(card, plan, root, report)
    identities: dict[str, set] = {}
    for i, name in enumerate(expected):
        if name not in names:
            report.add(name, "missing: rebuild it (rerun the build) or restore the file")
            continue
        entry = manifest.shard(i) if manifest is not None else None
        _check_shard(root, i, name, entry, plan, vocab, report, identities)
    _check_identities(identities, report)
    if manifest is not None:
        _check_fingerprint(manifest, plan, identities, report)
    if card is not None and manifest is not None:
        _check_card(root, card[0], manifest, identities, report, links_within)
    if replay or replay_shards:
        if manifest is None:
            report.add("replay", "needs a valid manifest.json; fix it first")
        else:
            _replay(root, manifest, replay, replay_shards, seed, device, teacher, compass, report)
    return report


def _in_split(name: str) -> bool:
    return re.fullmatch(r"data/train-[^/]*\.parquet", name) is not None


def _data_files(root: str) -> list[str]:
    """Files under root/data, as paths relative to root."""
    fs, base = open_root(root)
    folder = f"{base}/{DATA_DIR}"
    if not fs.isdir(folder):
        return []
    out = []
    for path in fs.find(folder):
        rel = path[len(base.rstrip("/")) + 1 :] if path.startswith(base) else path
        out.append(rel.lstrip("/"))
    return sorted(out)


def _load_manifest(root: str, report: VerifyReport) -> Manifest | None:
    if not Manifest.exists(root):
        report.add(MANIFEST_FILE, "missing: the dataset has no record of its shards")
        return None
    try:
        return Manifest.load(root)
    except TsdfmError as e:
        report.add(MANIFEST_FILE, str(e))
        return None


def _plan(
    manifest: Manifest | None, root: str, names: list[str], report: VerifyReport
) -> _Plan | None:
    if manifest is not None:
        d = manifest.to_dict()
        return _Plan(
            manifest.num_shards,
            manifest.rows_per_shard,
            manifest.plan.get("config") or {},
            manifest.fingerprint,
            d.get("package_version"),
            (manifest.teacher or {}).get("solver"),
        )
    # no usable manifest: take the plan from the first shard that carries metadata
    for name in names:
        try:
            meta = read_footer(root, name).metadata
        except DataError:
            continue
        if (
            meta
            and isinstance(meta.get("config"), dict)
            and isinstance(meta.get("num_shards"), int)
        ):
            cfg = meta["config"]
            report.notes.append(f"plan taken from the metadata of {name} (no valid manifest)")
            return _Plan(
                meta["num_shards"],
                int(cfg.get("trajectories_per_shard", 0)) or 1,
                cfg,
                None,
                meta.get("package_version"),
            )
    report.add(DATA_DIR, "no readable shard with tsdfm metadata; nothing else can be checked")
    return None


def _confined(
    root: str, path: Any, what: str, report: VerifyReport, within: str | None = None
) -> None:
    """A path read from a file must stay inside the dataset folder (and its links inside
    ``within``, default the folder): ``tsdfm.models.paths.confined``; a PathError becomes a
    problem of that file."""
    if not isinstance(path, str):
        return  # reported by the check that reads it
    base = open_root(root)[1]
    try:
        confined(base, path, what)  # an absolute path, a '..' that climbs out, a link out …
    except PathError as e:
        if within is None:
            report.add(what.split(" ")[0], str(e))
            return
        try:  # … unless the link points into ``within`` (a Hub snapshot's blob store)
            confined(within, os.path.join(os.path.relpath(base, within), path), what)
        except PathError as e:
            report.add(what.split(" ")[0], str(e))


def _check_manifest(
    root: str, manifest: Manifest, plan: _Plan, report: VerifyReport, within: str | None
) -> None:
    d = manifest.to_dict()
    if d.get("format") != FORMAT:
        report.add(MANIFEST_FILE, f"format is {d.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(d.get("package_version"), str):
        report.add(MANIFEST_FILE, "package_version is missing")
    missing = manifest.missing()
    if missing:
        report.add(
            MANIFEST_FILE,
            f"{len(missing)} planned shard(s) not recorded {missing[:10]}: the build did not "
            "finish; rerun it",
        )
    if d.get("totals") != manifest.totals():
        report.add(
            MANIFEST_FILE,
            f"totals {d.get('totals', {}).get('rows')} rows / {d.get('totals', {}).get('bytes')} "
            f"bytes disagree with the shard entries ({manifest.totals()['rows']} rows / "
            f"{manifest.totals()['bytes']} bytes): the manifest was edited",
        )
    cfg = plan.config
    if cfg.get("shards") != plan.num_shards:
        report.add(
            MANIFEST_FILE,
            f"plan.num_shards={plan.num_shards} but config.shards={cfg.get('shards')}",
        )
    if cfg.get("trajectories_per_shard") != plan.rows_per_shard:
        report.add(
            MANIFEST_FILE,
            f"plan.rows_per_shard={plan.rows_per_shard} but "
            f"config.trajectories_per_shard={cfg.get('trajectories_per_shard')}",
        )
    for i in manifest.committed():
        entry = manifest.shard(i)
        if entry["rows"] != plan.rows_per_shard:
            report.add(
                MANIFEST_FILE,
                f"shard {i:05d} is recorded with {entry['rows']} rows, the plan has "
                f"{plan.rows_per_shard} per shard",
            )
        what = f"{MANIFEST_FILE} shard {i:05d} path"
        _confined(root, entry.get("path"), what, report, within)
        if entry.get("path") != shard_name(i, plan.num_shards):
            report.add(MANIFEST_FILE, f"shard {i:05d} is recorded at {entry.get('path')!r}")
    total = sum(manifest.shard(i)["rows"] for i in manifest.committed())
    if not missing and total != plan.num_shards * plan.rows_per_shard:
        report.add(
            MANIFEST_FILE,
            f"{total} rows recorded, the plan has {plan.num_shards} × {plan.rows_per_shard}",
        )


def _build_config(config: dict[str, Any]):
    from tsdfm.pipeline.config import BuildConfig

    return BuildConfig.from_dict(config)


def _check_fingerprint(
    manifest: Manifest, plan: _Plan, identities: dict[str, set], report: VerifyReport
) -> None:
    """The manifest's fingerprint must be the one of its config and the shards' identities."""
    teacher = identities.get("teacher_identity", set())
    compass = identities.get("compass_identity", set())
    if len(teacher) != 1 or len(compass) != 1:
        return  # reported by _check_identities or per shard
    try:
        cfg = _build_config(plan.config)
    except (TsdfmError, TypeError) as e:
        report.add(MANIFEST_FILE, f"the recorded config is not a valid build config ({e})")
        return
    tokenizer = identities.get("tokenizer_identity", set())
    recorded = manifest.tokenizer_identity
    if recorded is not MISSING and len(tokenizer) == 1 and recorded not in tokenizer:
        report.add(
            MANIFEST_FILE,
            f"tokenizer_identity {recorded} is not the tokenizer the shards record "
            f"({next(iter(tokenizer))}): the manifest was edited or the shards mixed; rebuild",
        )
    fp = cfg.fingerprint(next(iter(teacher)), next(iter(compass)))
    if fp != manifest.fingerprint:
        report.add(
            MANIFEST_FILE,
            f"fingerprint {manifest.fingerprint} is not the fingerprint of the recorded config "
            f"and checkpoints ({fp}): the manifest's config or fingerprint was edited",
        )


def _check_identities(identities: dict[str, set], report: VerifyReport) -> None:
    for key, values in sorted(identities.items()):
        if len(values) > 1:
            report.add(
                DATA_DIR,
                f"shards disagree on {key}: {sorted(map(str, values))} (mixed builds)",
            )


# the card ------------------------------------------------------------------------------------


def _load_card(root: str, report: VerifyReport) -> tuple[dict[str, Any], str] | None:
    try:
        card = read_card(root)
    except DataError as e:
        report.add(CARD_FILE, str(e))
        return None
    if card is None:
        report.notes.append(
            f"no {CARD_FILE}: `tsdfm-pipeline publish` writes one; the build does at its end"
        )
    return card


def _check_card(
    root: str,
    meta: dict[str, Any],
    manifest: Manifest,
    identities: dict[str, set],
    report: VerifyReport,
    within: str | None,
) -> None:
    def bad(what: str) -> None:
        report.add(CARD_FILE, what + "; regenerate the card")

    totals = manifest.totals()
    configs = meta.get("configs") or []
    paths = [
        df.get("path")
        for c in configs
        if isinstance(c, dict)
        for df in (c.get("data_files") or [])
        if isinstance(df, dict)
    ]
    for path in paths:
        _confined(root, path, f"{CARD_FILE} configs[].data_files path", report, within)
    if paths != [DATA_FILES]:
        bad(f"configs.data_files is {paths}, expected [{DATA_FILES!r}]")
    info = meta.get("dataset_info") or {}
    config = manifest.plan.get("config") or {}
    version = config.get("schema_version", 1)
    text = stores_text({"schema_version": version, "config": config})
    if info.get("features") != features_yaml(version, text):
        bad("dataset_info.features do not match the trajectory schema")
    splits = info.get("splits") or []
    train = [s for s in splits if isinstance(s, dict) and s.get("name") == "train"]
    if len(train) != 1 or train[0].get("num_examples") != totals["rows"]:
        got = train[0].get("num_examples") if train else None
        bad(f"dataset_info says {got} train examples, the manifest {totals['rows']}")
    if info.get("download_size") != totals["bytes"]:
        bad(f"download_size {info.get('download_size')} ≠ {totals['bytes']} bytes of shards")
    t = meta.get("tsdfm") or {}
    if t.get("fingerprint") != manifest.fingerprint:
        bad(f"fingerprint {t.get('fingerprint')} ≠ the manifest's {manifest.fingerprint}")
    if t.get("schema_version") != version:
        bad(f"schema_version {t.get('schema_version')} ≠ the manifest's {version}")
    for key, values in identities.items():
        if len(values) == 1 and t.get(key) != next(iter(values)):
            bad(f"{key} {t.get(key)} ≠ the shards' {next(iter(values))}")


# vocabulary ----------------------------------------------------------------------------------


def _vocab(
    card: tuple[dict[str, Any], str] | None, plan: _Plan, root: str, report: VerifyReport
) -> _Vocab:
    """Token-id ranges from the card, else the teacher's config, else the data itself."""
    model = ((card[0].get("tsdfm") or {}).get("model") if card else None) or None
    origin = f"{CARD_FILE} (tsdfm.model)"
    if model is None and isinstance(plan.solver, dict):
        model, origin = plan.solver, f"{MANIFEST_FILE} (teacher.solver)"
    if model is None and plan.config.get("teacher"):
        from tsdfm.pipeline.card import teacher_facts

        facts = teacher_facts(plan.config["teacher"])
        model = facts.to_dict() if facts else None
        origin = f"teacher checkpoint {plan.config['teacher']}"
    if isinstance(model, dict) and isinstance(model.get("vocab_size"), int):
        return _Vocab(
            model["vocab_size"],
            model.get("mask_token_id") if model.get("source") == "mask" else None,
            model.get("seq_len"),
            model.get("source"),
            origin,
        )
    report.notes.append(
        "teacher vocabulary unknown (no tsdfm.model in the card, teacher checkpoint not "
        "reachable): the mask source and V are inferred from the data"
    )
    return _Vocab(None, None, None, None, "data")


# one shard -----------------------------------------------------------------------------------


def _check_shard(
    root: str,
    i: int,
    name: str,
    entry: dict[str, Any] | None,
    plan: _Plan,
    vocab: _Vocab,
    report: VerifyReport,
    identities: dict[str, set],
) -> None:
    fs, base = open_root(root)
    path = f"{base.rstrip('/')}/{name}"
    size = fs.size(path)
    if entry is not None:
        if size != entry["bytes"]:
            report.add(name, f"{size} bytes, the manifest records {entry['bytes']} (truncated?)")
        digest = file_sha256(path, fs)
        if digest != entry["sha256"]:
            report.add(
                name,
                f"sha256 {digest[:16]}… ≠ recorded {entry['sha256'][:16]}…: the file changed "
                "after the build (corrupt or altered); rebuild it",
            )
    try:
        footer = read_footer(root, name)
    except DataError as e:
        report.add(name, str(e).replace(f"{path} ", "", 1))
        return
    _check_metadata(i, name, footer, plan, report, identities)
    if footer.schema != plan.schema():
        what = f"the trajectory schema v{plan.schema_version}"
        report.add(name, f"schema differs from {what}: " + _schema_diff(footer, plan.schema()))
        return
    if entry is not None and footer.rows != entry["rows"]:
        report.add(name, f"{footer.rows} rows, the manifest records {entry['rows']}")
    if footer.rows != plan.rows_per_shard:
        report.add(name, f"{footer.rows} rows, the plan has {plan.rows_per_shard} per shard")
    if footer.max_row_group_bytes > MAX_ROW_GROUP_BYTES:
        report.add(name, f"a row group holds {footer.max_row_group_bytes:,} bytes (> 100 MB)")
    try:
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read()
    except (pa.ArrowInvalid, OSError) as e:
        report.add(name, f"the data pages do not decode ({e}); rebuild the shard")
        return
    _check_rows(i, name, table, plan, vocab, report)
    report.shards_checked.append(i)
    report.rows_checked += table.num_rows


def _schema_diff(footer, want: pa.Schema) -> str:
    got = footer.schema
    parts = []
    for f in want:
        if f.name not in got.names:
            parts.append(f"column {f.name} is missing")
        elif not got.field(f.name).equals(f):
            parts.append(f"column {f.name} is {got.field(f.name).type}, the contract says {f.type}")
    extra = [n for n in got.names if n not in want.names]
    if extra:
        parts.append(f"extra column(s) {extra}")
    if not parts and got.names != want.names:
        parts.append(f"columns are in the order {got.names}, expected {want.names}")
    return "; ".join(parts) or "field nullability or metadata differ"


def _check_metadata(
    i: int,
    name: str,
    footer: ShardFooter,
    plan: _Plan,
    report: VerifyReport,
    identities: dict[str, set],
) -> None:
    meta = footer.metadata  # read by the one reader, strictly (footer.error)
    if footer.error is not None:
        report.add(name, f"{footer.error}; rebuild the shard")
    if meta is None:
        return
    expected: dict[str, Any] = {
        "schema_version": plan.schema_version,
        "shard": i,
        "num_shards": plan.num_shards,
        "config": plan.config,
    }
    if plan.fingerprint is not None:
        expected["fingerprint"] = plan.fingerprint
    if plan.package_version is not None:
        expected["package_version"] = plan.package_version
    seed = plan.config.get("seed")
    if isinstance(seed, int):
        expected["shard_seed"] = trajectory_seed(seed, i * plan.rows_per_shard)
    for key, want in expected.items():
        got = meta.get(key)
        if got != want:
            show = (lambda v: "{…}") if key == "config" else repr
            report.add(
                name,
                f"metadata {key} = {show(got)}, the manifest says {show(want)}"
                + (" (config differs)" if key == "config" else ""),
            )
    for key in ("teacher_identity", "compass_identity", "tokenizer_identity"):
        identities.setdefault(key, set()).add(meta.get(key))


# rows ----------------------------------------------------------------------------------------


class _Rows:
    """Reports each broken invariant of one shard with the first rows that break it."""

    def __init__(self, name: str, tid: np.ndarray, report: VerifyReport):
        self.name, self.tid, self.report = name, tid, report

    def check(self, bad: np.ndarray, what: str) -> None:
        """bad: (B,) bool, True where row r breaks ``what``."""
        rows = np.flatnonzero(bad)
        if rows.size == 0:
            return
        shown = ", ".join(f"{r} (id {self.tid[r]})" for r in rows[:_SHOW].tolist())
        more = f" and {rows.size - _SHOW} more" if rows.size > _SHOW else ""
        self.report.add(self.name, f"{rows.size} row(s) break '{what}': rows {shown}{more}")


def _check_rows(
    i: int, name: str, table: pa.Table, plan: _Plan, vocab: _Vocab, report: VerifyReport
) -> None:
    """The contract's row invariants, all of them, on every row: the one decoder
    (``decode_rows``: shapes) and the one composition of the named predicates (``RowRules``)."""
    if table.num_rows == 0:
        report.add(name, "holds no rows")
        return
    tid = table.column("trajectory_id").combine_chunks().fill_null(-1).to_numpy()
    rows_out = _Rows(name, tid, report)
    S, K = plan.nav.get("student_steps"), plan.nav.get("candidates")
    if not isinstance(S, int) or not isinstance(K, int):
        report.add(name, "the recorded config has no navigator.student_steps/candidates")
        return
    try:
        rows = decode_rows(table, steps=S, seq_len=vocab.seq_len or None, num_candidates=K)
    except RowError as e:
        rows_out.check(e.bad, e.what)
        return
    except DataError as e:
        report.add(name, str(e))
        return
    V, mask = vocab.vocab_size, vocab.mask_token_id
    if vocab.source is None:  # infer: under the mask source x_0 is all [MASK], the largest id
        mask = infer_mask_token(rows.states)
        V = mask
    rules = RowRules.from_config(plan.config, shard=i, vocab_size=V, mask_token_id=mask)
    rules = replace(rules, rows_per_shard=plan.rows_per_shard)
    for what, bad in rules.violations(rows):
        rows_out.check(bad, what)
    rows_out.check(text_all_or_none(rows.text or []), "text is present in every row or in none")
    if mask is None and V is None:
        note = "uniform source with unknown V: token ids checked only for ≥ 0"
        if note not in report.notes:
            report.notes.append(note)


# replay --------------------------------------------------------------------------------------


def choose_replay(
    committed: list[int], replay: int, named: Sequence[int] | None, seed: int, num_shards: int
) -> list[int]:
    """The shards to replay: the named ones, or ``replay`` of the committed ones at random."""
    if named:
        bad = [i for i in named if not 0 <= i < num_shards]
        if bad:
            raise ConfigError(f"replay shard(s) {bad} outside the plan of {num_shards} shards")
        return sorted(set(named))
    if replay < 0:
        raise ConfigError(f"--replay {replay} must be ≥ 0")
    rng = random.Random(seed)
    return sorted(rng.sample(committed, min(replay, len(committed))))


def _recorded_teacher(root: str, manifest: Manifest) -> str | None:
    """The teacher identity the committed shards record (None if they record none)."""
    committed = manifest.committed()
    if not committed:
        return None
    meta = read_footer(root, shard_name(committed[0], manifest.num_shards)).metadata or {}
    found = meta.get("teacher_identity")
    return found if isinstance(found, str) else None


def _replay(
    root: str,
    manifest: Manifest,
    replay: int,
    named: Sequence[int] | None,
    seed: int,
    device: str,
    teacher: str | None,
    compass: str | None,
    report: VerifyReport,
) -> None:
    """Rebuild shards with the recorded config into a temp dir and compare their bytes."""
    from tsdfm.pipeline.worker import ShardBuilder

    indices = choose_replay(manifest.committed(), replay, named, seed, manifest.num_shards)
    try:
        recorded = _build_config(manifest.plan["config"])
    except (TsdfmError, TypeError) as e:
        report.add("replay", f"the recorded config does not load ({e})")
        return
    with tempfile.TemporaryDirectory(prefix="tsdfm-replay-") as tmp:
        try:
            # the recorded config goes into every shard; the checkpoints load from where they
            # are now (--teacher / --compass when they moved)
            builder = ShardBuilder(
                recorded,
                tmp,
                device,
                teacher=teacher or recorded.teacher,
                compass=compass if compass is not None else recorded.compass,
                # checked against the files before the teacher (or its remote code) loads
                teacher_identity=_recorded_teacher(root, manifest),
            )
        except TsdfmError as e:
            report.add(
                "replay",
                f"cannot load the recorded checkpoints ({e}); pass --teacher/--compass with "
                "the checkpoints that built the dataset",
            )
            return
        if builder.provenance.fingerprint != manifest.fingerprint:
            report.add(
                "replay",
                f"the checkpoints give fingerprint {builder.provenance.fingerprint}, the dataset "
                f"has {manifest.fingerprint}: pass --teacher/--compass with the checkpoints that "
                "built it",
            )
            return
        for i in indices:
            result = builder.build(i)
            entry = manifest.shard(i)
            want = entry["sha256"] if entry else None
            if result.info.sha256 != want:
                report.add(
                    shard_name(i, manifest.num_shards),
                    f"replay gave different bytes (sha256 {result.info.sha256[:16]}… vs recorded "
                    f"{str(want)[:16]}…): the shard was altered, or this machine's hardware or "
                    "software differs from the build's",
                )
            report.replayed.append(i)
