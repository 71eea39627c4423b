"""``manifest.json``: the plan of a dataset build and the record of its committed shards.

Layout (keys sorted, rewritten atomically by temp file + rename after every commit)::

    {
      "format": "tsdfm-trajectories",
      "schema_version": 1,
      "package_version": "0.1.0",
      "fingerprint": "<config fingerprint>",
      "plan": {...config..., "num_shards": N, "rows_per_shard": R},
      "shards": {
        "00003": {"path": "data/train-00003-of-00008.parquet", "rows": R, "bytes": ...,
                  "sha256": "<hex>", "counters": {"trajectories": ...}, "stats": {...}}
      },
      "totals": {"shards": ..., "rows": ..., "bytes": ..., "counters": {...}},
      "teacher": {"family": "mdlm", "trust_remote_code": true, "code": {"modeling_mdlm.py":
                  "<sha256>"}, ...}
    }

``teacher`` is present only for a teacher of another family: what its adapter decided
(``tsdfm.models.teachers``), including whether its own model code ran and that code's hash.

A shard is recorded only after its file was committed (renamed to its final name), so the
manifest never lists bytes that are not safe. A shard file without a manifest entry (the
driver died between the rename and the record) is rebuilt on resume: a shard is a pure
function of (config, index), so the rebuild gives the same bytes.

One driver process owns the manifest; workers report to it. A build reads manifest.json once
into one :class:`Manifest` (or creates it), updates it in memory and rewrites the file after
every change; nothing else reads the file during the build. ``record_shard`` is safe to call
from several threads of that process.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

from tsdfm.models import __version__
from tsdfm.models.data.schema import SCHEMA_VERSIONS
from tsdfm.models.errors import ConfigError, DataError
from tsdfm.models.hashing import canonical_json, file_sha256
from tsdfm.pipeline.shards import (
    MAX_SHARDS,
    ShardInfo,
    atomic_write,
    open_root,
    shard_name,
)

MANIFEST_FILE = "manifest.json"
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()  # key absent
FORMAT = "tsdfm-trajectories"
_SHARD_KEY = re.compile(r"^[0-9]{5}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _key(index: int) -> str:
    return f"{index:05d}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_plan(plan: Any, where: str) -> dict[str, Any]:
    if not isinstance(plan, dict):
        raise ConfigError(f"{where}: the plan must be a dict, got {type(plan).__name__}")
    for key in ("num_shards", "rows_per_shard"):
        if not _positive_int(plan.get(key)):
            raise ConfigError(f"{where}: plan.{key} must be a positive int, got {plan.get(key)!r}")
    if plan["num_shards"] > MAX_SHARDS:
        raise ConfigError(f"{where}: plan.num_shards {plan['num_shards']} exceeds {MAX_SHARDS}")
    return plan


def _numbers(values: Any, what: str) -> dict[str, int | float]:
    """A flat dict of finite numbers (counters) as given, or a DataError."""
    if values is None:
        return {}
    ok = isinstance(values, dict) and all(
        isinstance(k, str)
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        for k, v in values.items()
    )
    if not ok:
        raise DataError(f"{what} must map names to finite numbers, got {values!r}")
    return dict(values)


class Manifest:
    """The manifest of the dataset at ``root`` (local path or fsspec URL).

    Make one with :meth:`create` (new build) or :meth:`load` (resume, verify, publish).
    """

    def __init__(self, root: str, data: dict[str, Any]):
        self.root = str(root)
        self._fs, self._base = open_root(self.root)
        self._data = data
        self._lock = threading.Lock()

    # construction ----------------------------------------------------------------------------

    @classmethod
    def path_of(cls, root: str) -> str:
        """fs-internal path of ``root/manifest.json``."""
        _, base = open_root(root)
        return f"{base.rstrip('/')}/{MANIFEST_FILE}"

    @classmethod
    def exists(cls, root: str) -> bool:
        fs, _ = open_root(root)
        return fs.exists(cls.path_of(root))

    @classmethod
    def create(
        cls,
        root: str,
        plan: dict[str, Any],
        fingerprint: str,
        tokenizer_identity: str | Any | None = MISSING,
        teacher: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write a fresh manifest with no shards (replacing any manifest at ``root``).

        ``teacher``: an adapter teacher's record (module docstring), left out when None.

        ``tokenizer_identity`` (sha256 of the teacher's tokenizer.json, or None without one)
        is recorded so a resume can refuse a changed tokenizer; the fingerprint leaves it out
        to keep the fingerprints of datasets built before it was recorded.
        """
        plan = _check_plan(plan, f"{root}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ConfigError(f"the config fingerprint must be a non-empty str: {fingerprint!r}")
        data = {
            "format": FORMAT,
            # the build config records schema_version from v2 on (absent: v1)
            "schema_version": (plan.get("config") or {}).get("schema_version", 1),
            "package_version": __version__,
            "fingerprint": fingerprint,
            "plan": json.loads(canonical_json(plan, "the plan")),
            "shards": {},
        }
        if tokenizer_identity is not MISSING:
            data["tokenizer_identity"] = tokenizer_identity
        if teacher is not None:
            data["teacher"] = json.loads(canonical_json(teacher, "the teacher record"))
        manifest = cls(root, data)
        manifest._write()
        return manifest

    @classmethod
    def load(cls, root: str) -> Manifest:
        """Read and validate ``root/manifest.json``; DataError naming the problem otherwise."""
        fs, _ = open_root(root)
        path = cls.path_of(root)
        if not fs.exists(path):
            raise DataError(
                f"{root} has no {MANIFEST_FILE}: it is not a tsdfm dataset folder, or its build "
                "never started; run `tsdfm-pipeline build` with this --out"
            )
        try:
            with fs.open(path, "rb") as f:
                data = json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{path} is not valid JSON ({e}): restore it or rebuild with --overwrite"
            ) from None
        cls._validate(data, path)
        return cls(root, data)

    @staticmethod
    def _validate(data: Any, path: str) -> None:
        def bad(what: str) -> DataError:
            return DataError(f"{path} is malformed: {what}; restore it or rebuild with --overwrite")

        if not isinstance(data, dict):
            raise bad("the top level is not an object")
        for key, typ in (("schema_version", int), ("fingerprint", str), ("plan", dict)):
            if not isinstance(data.get(key), typ):
                raise bad(f"'{key}' is missing or not a {typ.__name__}")
        if data["schema_version"] not in SCHEMA_VERSIONS:
            raise DataError(
                f"{path} describes dataset schema v{data['schema_version']}, this "
                f"tsdfm-pipeline handles v{' and v'.join(map(str, SCHEMA_VERSIONS))}: install "
                "the version that wrote it"
            )
        try:
            plan = _check_plan(data["plan"], path)
        except ConfigError as e:
            raise bad(str(e).partition(": ")[2]) from None
        tok = data.get("tokenizer_identity")
        if tok is not None and not isinstance(tok, str):
            raise bad("'tokenizer_identity' is not a string or null")
        if not isinstance(data.get("teacher", {}), dict):
            raise bad("'teacher' is not an object")
        shards = data.get("shards")
        if not isinstance(shards, dict):
            raise bad("'shards' is missing or not an object")
        for key, entry in shards.items():
            if not _SHARD_KEY.match(key) or int(key) >= plan["num_shards"]:
                raise bad(f"shard key {key!r} is not an index below {plan['num_shards']:05d}")
            ok = (
                isinstance(entry, dict)
                and isinstance(entry.get("rows"), int)
                and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("sha256"), str)
                and _SHA256.match(entry["sha256"]) is not None
                and isinstance(entry.get("stats", {}), dict)
            )
            if not ok:
                raise bad(f"shard {key} needs int rows and bytes and a hex sha256")
            try:
                _numbers(entry.get("counters", {}), "counters")
            except DataError:
                raise bad(f"shard {key} has counters that are not numbers") from None

    # plan ------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self._data["fingerprint"]

    @property
    def tokenizer_identity(self) -> str | Any | None:
        """The recorded tokenizer identity; MISSING in manifests written before it was kept."""
        return self._data.get("tokenizer_identity", MISSING)

    @property
    def teacher(self) -> dict[str, Any] | None:
        """An adapter teacher's record (family, remote code and its hash, ...); None for
        this project's own teachers."""
        return self._data.get("teacher")

    @property
    def plan(self) -> dict[str, Any]:
        return self._data["plan"]

    @property
    def num_shards(self) -> int:
        return self._data["plan"]["num_shards"]

    @property
    def rows_per_shard(self) -> int:
        return self._data["plan"]["rows_per_shard"]

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the manifest's JSON object."""
        return json.loads(json.dumps(self._data))

    def check_fingerprint(self, fingerprint: str) -> None:
        """ConfigError unless the dataset at root was planned from this config."""
        if fingerprint != self.fingerprint:
            raise ConfigError(
                f"{self.root} holds a dataset with fingerprint {self.fingerprint}, this config "
                f"has {fingerprint}: use a new output folder or --overwrite"
            )

    def check_plan(self, plan: dict[str, Any]) -> None:
        """ConfigError unless ``plan`` cuts the dataset into the same shards."""
        plan = _check_plan(plan, self.root)
        for key in ("num_shards", "rows_per_shard"):
            if plan[key] != self.plan[key]:
                raise ConfigError(
                    f"{self.root} was planned with {key}={self.plan[key]}, this run asks for "
                    f"{plan[key]}: use the same value, a new output folder or --overwrite"
                )

    # shards ----------------------------------------------------------------------------------

    def record_shard(
        self,
        info: ShardInfo,
        counters: dict[str, int | float] | None = None,
        stats: dict[str, Any] | None = None,
    ) -> None:
        """Record a committed shard and rewrite manifest.json atomically.

        Args:
            info: what ``write_shard`` returned.
            counters: additive per-shard counters (trajectories, candidates, energy calls,
                seconds in teacher forward, ...); summed by :meth:`totals`.
            stats: per-shard statistics (e.g. mean energy gain); stored, not merged.
        """
        expected = shard_name(info.index, self.num_shards)
        if info.path != expected:
            raise DataError(
                f"shard {info.path} does not belong to this plan of {self.num_shards} shards "
                f"(expected {expected})"
            )
        entry = {
            "path": info.path,
            "rows": info.rows,
            "bytes": info.bytes,
            "sha256": info.sha256,
            "counters": _numbers(counters, f"counters of shard {info.index}"),
            "stats": json.loads(canonical_json(stats or {}, f"stats of shard {info.index}")),
        }
        with self._lock:
            self._data["shards"][_key(info.index)] = entry
            self._write()

    def forget(self, index: int) -> None:
        """Drop shard ``index`` from the record (e.g. found corrupt) and rewrite the file."""
        with self._lock:
            if self._data["shards"].pop(_key(index), None) is not None:
                self._write()

    def shard(self, index: int) -> dict[str, Any] | None:
        """The recorded entry of shard ``index``, or None."""
        entry = self._data["shards"].get(_key(index))
        return None if entry is None else json.loads(json.dumps(entry))

    def committed(self) -> list[int]:
        """Indices of recorded shards, ascending."""
        return sorted(int(k) for k in self._data["shards"])

    def missing(self) -> list[int]:
        """Indices of planned shards not recorded yet, ascending."""
        return [i for i in range(self.num_shards) if _key(i) not in self._data["shards"]]

    def verify(self, index: int) -> bool:
        """True iff shard ``index`` is recorded and its file has the recorded size and sha256."""
        entry = self._data["shards"].get(_key(index))
        if entry is None:
            return False
        path = f"{self._base.rstrip('/')}/{shard_name(index, self.num_shards)}"
        try:
            if not self._fs.exists(path) or self._fs.size(path) != entry["bytes"]:
                return False
            return file_sha256(path, self._fs) == entry["sha256"]
        except FileNotFoundError:
            return False

    def status(self) -> tuple[list[int], list[int], list[int]]:
        """What a build must do: (todo, done, corrupt) shard indices, ascending.

        Recorded shards whose file still has its size and sha256 are done; missing, unrecorded
        and corrupt (flipped byte, truncated, deleted) shards are todo; corrupt ones, recorded
        but failing the check, are also listed in ``corrupt`` so the build can report them.
        Reads every committed shard once to hash it.
        """
        todo, done, corrupt = [], [], []
        for i in range(self.num_shards):
            if _key(i) not in self._data["shards"]:
                todo.append(i)
            elif self.verify(i):
                done.append(i)
            else:
                todo.append(i)
                corrupt.append(i)
        return todo, done, corrupt

    def totals(self) -> dict[str, Any]:
        """{"shards", "rows", "bytes", "counters"} summed over recorded shards."""
        entries = [self._data["shards"][k] for k in sorted(self._data["shards"])]
        counters: dict[str, int | float] = {}
        for entry in entries:
            for name, value in entry.get("counters", {}).items():
                counters[name] = counters.get(name, 0) + value
        return {
            "shards": len(entries),
            "rows": sum(e["rows"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "counters": dict(sorted(counters.items())),
        }

    def _write(self) -> None:
        self._data["totals"] = self.totals()
        text = json.dumps(self._data, indent=2, sort_keys=True, allow_nan=False) + "\n"
        try:
            atomic_write(self._fs, self.path_of(self.root), lambda f: f.write(text.encode()))
        except OSError as e:  # e.g. ENOSPC: the old manifest.json is left as it was
            raise DataError(
                f"could not write {MANIFEST_FILE} in {self.root} ({e.strerror or e}); free the "
                "space (or fix the permissions) and rerun the same command: the shards "
                "committed so far are kept"
            ) from None


TIMING_SUFFIX = "_seconds"


def without_timings(data: Any) -> Any:
    """A manifest's JSON without its timing counters (``*_seconds``), for content identity.

    Everything else a rebuild writes (plan, fingerprint, shard sizes and sha256, the other
    counters, the statistics) is a function of the config; timings are not.
    """
    if not isinstance(data, dict):
        return data
    out = json.loads(json.dumps(data))
    blocks = [e.get("counters") for e in (out.get("shards") or {}).values() if isinstance(e, dict)]
    blocks.append(
        (out.get("totals") or {}).get("counters") if isinstance(out.get("totals"), dict) else None
    )
    for counters in blocks:
        if isinstance(counters, dict):
            for name in [k for k in counters if k.endswith(TIMING_SUFFIX)]:
                del counters[name]
    return out


def plan_status(
    root: str, plan: dict[str, Any], fingerprint: str
) -> tuple[list[int], list[int], list[int]]:
    """What a resuming build must do at ``root``: (todo, done, corrupt) shard indices.

    Without a manifest every shard is todo; else :meth:`Manifest.status` of the manifest at
    ``root``, after checking that it was planned from this config (fingerprint) and cut into
    the same shards (ConfigError otherwise). A build that holds its manifest calls
    :meth:`Manifest.status` on it instead of reading the file again.
    """
    plan = _check_plan(plan, str(root))
    if not Manifest.exists(root):
        return list(range(plan["num_shards"])), [], []
    manifest = Manifest.load(root)
    manifest.check_fingerprint(fingerprint)
    manifest.check_plan(plan)
    return manifest.status()
