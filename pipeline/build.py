"""``tsdfm-pipeline build``: plan, resume, execute on Ray, record, summarise.

1. Identify teacher and compass from their files (no model is built on the driver): their
   identities and the config give the dataset's fingerprint, and a mismatch between them fails
   before any worker starts.
2. Take the output's lock, then read it once: empty (or absent) → new dataset; holding this
   fingerprint's manifest → resume; holding another dataset → refused unless ``overwrite``.
   That one :class:`Manifest` (read, or created) is the build's record until it ends.
3. Skip committed shards whose checksum holds; rebuild missing and corrupt ones.
4. Run the rest on the generic Ray executor, one :class:`ShardBuilder` per actor (each loads the
   models once); the driver records every committed shard in the manifest as it arrives.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from tsdfm.models.devices import check_device
from tsdfm.models.errors import ConfigError, DataError, TsdfmError
from tsdfm.pipeline.card import write_card
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.executor import (
    ExecutionReport,
    Setup,
    TaskEvent,
    connect,
    execute,
    plan_workers,
)
from tsdfm.pipeline.lock import LOCK_FILE, BuildLock
from tsdfm.pipeline.manifest import MANIFEST_FILE, MISSING, Manifest
from tsdfm.pipeline.shards import DATA_DIR, cleanup_temp, open_root
from tsdfm.pipeline.worker import Provenance, ShardBuilder, ShardResult, identify


@dataclass
class Progress:
    """What the progress callback receives after every committed shard, every retry, and about
    once a second while shards are in flight.

    ``trajectories`` counts those in committed shards; ``in_flight`` those navigated so far in
    shards not yet committed (a worker that dies loses them).
    """

    done_shards: int
    total_shards: int
    trajectories: int
    total_trajectories: int
    seconds: float
    energy_gain: float | None
    retries: int
    event: str = ""
    in_flight: int = 0


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


BOOKKEEPING = (MANIFEST_FILE, DATA_DIR, "README.md", LOCK_FILE)


def check_arguments(root: str, device: str, num_workers: int | None, max_retries: int) -> None:
    """Refuse bad execution arguments before anything is loaded or written."""
    if check_device(device).startswith("cuda:"):
        raise ConfigError(
            f"--device {device}: a build runs one worker per GPU; use --device cuda (or auto) "
            "and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if num_workers is not None and (
        not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1
    ):
        raise ConfigError(
            f"--num-workers {num_workers} must be at least 1 (omit it for one worker per GPU, "
            "else one per CPU)"
        )
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise ConfigError(
            f"--max-retries {max_retries} must be 0 or more (retries of a shard whose worker "
            "died; Ray reads -1 as unlimited restarts)"
        )
    protocol = str(root).partition("://")[0] if "://" in str(root) else "file"
    if protocol == "memory":
        raise ConfigError(
            f"--out {root}: a memory:// filesystem lives in one process, and the shards are "
            "written by worker processes; use a local folder or a shared URL (s3://, gs://, ...)"
        )
    open_root(root)  # an unknown protocol or a missing fsspec backend fails here, in one line


def check_output(root: str, fingerprint: str, overwrite: bool) -> tuple[str, Manifest | None]:
    """What ``root`` holds, without writing: (state, manifest).

    The state is "new", "resume", "orphaned" or "overwrite"; the manifest is read here, once,
    when this build resumes the folder's dataset (None otherwise).

    "orphaned" is a folder whose ``manifest.json`` was deleted but whose shards carry this
    config's fingerprint: the build rebuilds every shard in place (a shard is a pure function
    of the config and its index, so the bytes come out the same). Anything else that is not
    this dataset is refused unless ``overwrite``.
    """
    fs, base = open_root(root)
    if fs.exists(base) and not fs.isdir(base):
        raise ConfigError(f"output {root} is a file; pass a folder")
    entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base)] if fs.exists(base) else []
    entries = [e for e in entries if e != LOCK_FILE]
    has_manifest = MANIFEST_FILE in entries
    foreign = [e for e in entries if e not in BOOKKEEPING]
    if overwrite:
        if entries and foreign and not has_manifest:
            raise ConfigError(f"refusing to --overwrite {root}: it does not hold a tsdfm dataset")
        return ("overwrite" if entries else "new"), None
    if has_manifest:
        manifest = Manifest.load(root)
        manifest.check_fingerprint(fingerprint)
        return "resume", manifest
    if not entries:
        return "new", None
    if not foreign:
        found = _shard_fingerprints(root)
        if found and found == {fingerprint}:
            return "orphaned", None
        if found - {fingerprint}:
            other = sorted(found - {fingerprint})[0]
            raise ConfigError(
                f"output {root} has no {MANIFEST_FILE} and holds the shards of another dataset "
                f"(fingerprint {other}); rerun the command that built it to restore it, pass "
                "--overwrite to replace it, or use a new folder"
            )
        raise ConfigError(
            f"output {root} has no {MANIFEST_FILE} (deleted?) and no shard this build can "
            "recognise; rerun the exact command that built it to rebuild it in place, pass "
            "--overwrite to start over, or use a new folder"
        )
    raise ConfigError(
        f"output {root} is not empty and holds no tsdfm dataset "
        f"({', '.join(sorted(entries)[:3])}); pass an empty or new folder"
    )


def _shard_fingerprints(root: str) -> set[str]:
    """Fingerprints recorded in the metadata of the shard files under ``root/data``."""
    from tsdfm.pipeline.shards import read_footer

    fs, base = open_root(root)
    folder = f"{base.rstrip('/')}/{DATA_DIR}"
    if not fs.isdir(folder):
        return set()
    found = set()
    for path in fs.ls(folder, detail=False):
        name = path.rstrip("/").rpartition("/")[2]
        if not (name.startswith("train-") and name.endswith(".parquet")):
            continue
        try:
            meta = read_footer(root, f"{DATA_DIR}/{name}").metadata
        except TsdfmError:
            continue
        if meta and isinstance(meta.get("fingerprint"), str):
            found.add(meta["fingerprint"])
    return found


def prepare_output(root: str, state: str) -> None:
    """Make ``root`` ready to write (called holding the build lock): wipe on overwrite, probe."""
    fs, base = open_root(root)
    if state == "overwrite":
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
    say: Callable[[str], None] | None = None,
) -> BuildSummary:
    """Build (or resume) the dataset of ``cfg`` at ``root``.

    Everything that can be checked before the first shard is checked before anything is
    written (arguments, checkpoints, the output's contents, the Ray cluster and its devices),
    so a build that cannot start leaves the folder as it was. The build holds
    ``root/.tsdfm-build.lock`` from the moment it reads the output until it ends (a failed
    start removes the lock, and the folder when the lock created it).
    """
    say = say or (lambda line: None)
    start = time.perf_counter()
    check_arguments(root, device, num_workers, max_retries)
    prov = identify(cfg)  # from the files: the driver builds no model
    plan = plan_of(cfg)
    with BuildLock(root) as lock:
        if lock.took_over is not None:
            say(f"took over the lock of a build that is gone ({lock.took_over.describe()})")
        state, manifest = check_output(root, prov.fingerprint, overwrite)
        if manifest is not None:
            manifest.check_plan(plan)
            check_tokenizer(manifest, prov.tokenizer_identity)
        # Ray and its devices, before the first write (corrupt shards are found by hashing)
        if manifest is None or manifest.missing():
            say(
                "starting a local Ray cluster"
                if address is None and not os.environ.get("RAY_ADDRESS")
                else f"joining the Ray cluster at {address or os.environ['RAY_ADDRESS']}"
            )
            connect(address, num_cpus=None)
            plan_workers(device, num_workers)
        if state == "orphaned":
            say(f"{MANIFEST_FILE} is missing: rebuilding every shard in place from this config")
        prepare_output(root, state)
        if manifest is None:
            manifest = Manifest.create(
                root, plan, prov.fingerprint, prov.tokenizer_identity, prov.teacher
            )
        cleanup_temp(root)  # this build holds the lock: every temp file is a dead writer's
        todo, done, corrupt = manifest.status()
        if on_plan:
            on_plan(todo, done, corrupt)
        for index in corrupt:
            manifest.forget(index)
        report = None
        if todo:
            connect(address, num_cpus=None)
            loads = "the teacher" + (" and the compass" if cfg.compass else "")
            say(f"{len(todo)} shard(s) to build: starting the workers (each loads {loads} once)")

            def workers_ready(infos: list[dict]) -> None:
                devices = sorted({str(i.get("device")) for i in infos})
                say(f"{len(infos)} worker(s) ready on {', '.join(devices)}; building")
                if on_workers is not None:
                    on_workers(infos)

            try:
                report = build_shards(
                    cfg,
                    root,
                    prov,
                    todo,
                    manifest,
                    device=device,
                    num_workers=num_workers,
                    max_retries=max_retries,
                    progress=progress,
                    on_workers=workers_ready,
                )
            except BaseException:
                cleanup_temp(root)
                if state == "new" and not manifest.committed():
                    # e.g. the actors could not load the weights (only they build the models):
                    # nothing was built, so the folder is left as it was, for the fixed rerun
                    _undo_new(root)
                raise
            # a worker killed while writing leaves its temp file; its shard was built again
            # elsewhere, so nothing of this build needs it (every actor is stopped now)
            removed = cleanup_temp(root)
            if removed:
                say(f"removed {len(removed)} temp file(s) left by worker(s) that died")
        missing = manifest.missing()
        if missing:
            raise DataError(f"build ended with shards {missing} unrecorded; rerun to finish them")
        write_card(root, manifest=manifest)  # README.md: the card, from the manifest in memory
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


def _undo_new(root: str) -> None:
    """Remove what a new build wrote before its first shard: manifest.json and empty data/."""
    fs, base = open_root(root)
    base = base.rstrip("/")
    with contextlib.suppress(OSError):
        fs.rm(f"{base}/{MANIFEST_FILE}")
        if not fs.ls(f"{base}/{DATA_DIR}"):
            fs.rmdir(f"{base}/{DATA_DIR}")


def build_shards(
    cfg: BuildConfig,
    root: str,
    planned: Provenance,
    todo: list[int],
    manifest: Manifest,
    *,
    device: str = "auto",
    num_workers: int | None = None,
    max_retries: int = 3,
    progress: Callable[[Progress], None] | None = None,
    on_workers: Callable[[list[dict]], None] | None = None,
) -> ExecutionReport:
    """Build the shards ``todo`` on the Ray executor and record each in ``manifest``.

    Each actor holds one :class:`ShardBuilder` (the models loaded once, checked against
    ``planned``); a shard is recorded in the driver as soon as its worker returns, which is
    after its file was committed by rename. ``progress`` sees every recorded shard, every
    retry, and the batches navigated in shards in flight. Ray must be connected.
    """
    trajectories = 0
    gains: list[float] = []
    partial: dict[int, int] = {}  # shard in flight -> trajectories navigated so far

    def on_event(event: TaskEvent) -> None:
        nonlocal trajectories
        partial.pop(event.index, None)
        if event.kind == "progress":
            partial[event.index] = event.units
            what = ""
        elif event.kind == "done":
            result: ShardResult = event.result
            manifest.record_shard(result.info, result.counters, result.stats)
            trajectories += result.info.rows
            if "energy_gain" in result.stats:
                gains.append(result.stats["energy_gain"])
            what = f"shard {event.index}"
        else:
            what = f"worker died, shard {event.index} queued again"
        if progress:
            progress(
                Progress(
                    done_shards=event.done,
                    total_shards=cfg.shards,
                    trajectories=trajectories,
                    total_trajectories=cfg.total_trajectories,
                    seconds=event.seconds,
                    energy_gain=sum(gains) / len(gains) if gains else None,
                    retries=event.retries,
                    event=what,
                    in_flight=sum(partial.values()),
                )
            )

    return execute(
        Setup(ShardBuilder, (cfg, root), {"planned": planned}),
        ShardBuilder.build,
        todo,
        on_event=on_event,
        device=device,
        num_workers=num_workers,
        max_retries=max_retries,
        on_workers=on_workers,
        name="ShardActor",
        noun="shard",
        reports_progress=True,
    )


def check_tokenizer(manifest: Manifest, identity: str | None) -> None:
    """ConfigError when the dataset was built with another tokenizer than the teacher's now.

    The manifest records the tokenizer's identity (sha256 of tokenizer.json); a manifest
    written before it did is checked against the metadata of its first committed shard.
    """
    from tsdfm.pipeline.shards import read_footer

    recorded = manifest.tokenizer_identity
    for index in manifest.committed() if recorded is MISSING else []:
        try:
            meta = read_footer(manifest.root, manifest.shard(index)["path"]).metadata
        except TsdfmError:
            continue  # an unreadable shard is rebuilt anyway
        if meta is not None and "tokenizer_identity" in meta:
            recorded = meta["tokenizer_identity"]
            break
    if recorded is MISSING:
        return  # an old manifest with nothing committed: nothing to mix with
    if recorded != identity:
        raise ConfigError(
            f"{manifest.root} was built with tokenizer {recorded}, the teacher's tokenizer.json "
            f"is now {identity}: resuming would mix two tokenizers in one dataset; restore the "
            "tokenizer, or build into a new folder (or --overwrite)"
        )
