"""``tsdfm-pipeline build``: plan, resume, execute on Ray, record, summarise.

1. Load teacher and compass on the driver: their identities and the config give the dataset's
   fingerprint, and a mismatch fails before any worker starts.
2. Check the output: empty (or absent) → new dataset; holding this fingerprint's manifest →
   resume; holding another dataset → refused unless ``overwrite``.
3. Skip committed shards whose checksum holds; rebuild missing and corrupt ones.
4. Run the rest on Ray actors; record every committed shard in ``manifest.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from models.errors import ConfigError, DataError
from pipeline.card import write_card
from pipeline.config import BuildConfig
from pipeline.executor import ExecutionReport, Progress, connect, execute
from pipeline.manifest import MANIFEST_FILE, Manifest, plan_status
from pipeline.shards import DATA_DIR, cleanup_temp, open_root
from pipeline.worker import load_models, provenance


@dataclass
class BuildSummary:
    root: str
    fingerprint: str
    built: list[int]
    skipped: list[int]
    rebuilt_corrupt: list[int]
    totals: dict
    execution: ExecutionReport | None
    seconds: float

    @property
    def trajectories_per_second(self) -> float:
        if self.execution is None or not self.execution.results:
            return 0.0
        rows = sum(r.info.rows for r in self.execution.results.values())
        return rows / max(self.execution.seconds, 1e-9)


def plan_of(cfg: BuildConfig) -> dict:
    return {
        "num_shards": cfg.shards,
        "rows_per_shard": cfg.trajectories_per_shard,
        "config": cfg.to_dict(),
    }


def prepare_output(root: str, fingerprint: str, overwrite: bool) -> None:
    """Refuse an output that holds something else; wipe it first when ``overwrite``."""
    fs, base = open_root(root)
    if fs.exists(base) and not fs.isdir(base):
        raise ConfigError(f"output {root} is a file; pass a folder")
    entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base)] if fs.exists(base) else []
    has_manifest = MANIFEST_FILE in entries
    if has_manifest and not overwrite:
        Manifest.load(root).check_fingerprint(fingerprint)
        return
    foreign = [e for e in entries if e not in (MANIFEST_FILE, DATA_DIR, "README.md")]
    if entries and not has_manifest and not overwrite:
        raise ConfigError(
            f"output {root} is not empty and holds no tsdfm dataset "
            f"({', '.join(sorted(entries)[:3])}); pass an empty or new folder"
        )
    if overwrite and entries:
        if foreign and not has_manifest:
            raise ConfigError(f"refusing to --overwrite {root}: it does not hold a tsdfm dataset")
        for name in (MANIFEST_FILE, DATA_DIR, "README.md"):
            path = f"{base.rstrip('/')}/{name}"
            if fs.exists(path):
                fs.rm(path, recursive=True)
    try:
        fs.makedirs(f"{base.rstrip('/')}/{DATA_DIR}", exist_ok=True)
        probe = f"{base.rstrip('/')}/.write-probe"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        raise ConfigError(
            f"output {root} is not writable ({e.strerror or e}); pick another"
        ) from None


def run_build(
    cfg: BuildConfig,
    root: str,
    *,
    overwrite: bool = False,
    address: str | None = None,
    device: str = "auto",
    num_workers: int | None = None,
    max_retries: int = 3,
    progress: Callable[[Progress], None] | None = None,
    on_plan: Callable[[list[int], list[int], list[int]], None] | None = None,
    on_workers: Callable[[list[dict]], None] | None = None,
) -> BuildSummary:
    """Build (or resume) the dataset of ``cfg`` at ``root``."""
    start = time.perf_counter()
    teacher, compass = load_models(cfg, "cpu")
    prov = provenance(cfg, teacher, compass)
    del teacher, compass
    prepare_output(root, prov.fingerprint, overwrite)
    plan = plan_of(cfg)
    if not Manifest.exists(root):
        Manifest.create(root, plan, prov.fingerprint)
    cleanup_temp(root)
    todo, done, corrupt = plan_status(root, plan, prov.fingerprint)
    if on_plan:
        on_plan(todo, done, corrupt)
    manifest = Manifest.load(root)
    for index in corrupt:
        manifest.forget(index)
    report = None
    if todo:
        connect(address, num_cpus=None)

        def record(result) -> None:
            manifest.record_shard(result.info, result.counters, result.stats)

        report = execute(
            cfg, root, todo, record, device, num_workers, max_retries, progress, on_workers
        )
    manifest = Manifest.load(root)
    missing = manifest.missing()
    if missing:
        raise DataError(f"build ended with shards {missing} unrecorded; rerun to finish them")
    write_card(root)  # README.md: the dataset card, from the finished manifest
    return BuildSummary(
        root=root,
        fingerprint=prov.fingerprint,
        built=sorted(todo),
        skipped=done,
        rebuilt_corrupt=corrupt,
        totals=manifest.totals(),
        execution=report,
        seconds=time.perf_counter() - start,
    )
