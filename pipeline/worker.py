"""Build one shard: navigate its trajectories in batches and write them as Parquet (no Ray).

:class:`ShardBuilder` loads the teacher and compass once and builds any shard of the plan; the
build (``tsdfm.pipeline.build``) makes one per Ray actor of the generic executor, and
``verify --replay`` makes one from a dataset's recorded config. The driver itself builds no
model: :func:`identify` gets the identities, and so the fingerprint, from the files.

The teacher may be of any family an adapter exists for (``tsdfm.models.teachers``): the
driver reads it with ``teacher_files`` and each builder loads it with ``open_teacher`` (the
build config's ``teacher_format`` and ``trust_remote_code``), then runs one denoising step
through it (``tsdfm.models.teachers.check.step_check``) before its first shard.

A shard is a pure function of (config, shard index): trajectory i has seed ``seed · 2^32 + i``
and all randomness is counter-based, so a retried shard has the same bytes on the same hardware
and software.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tsdfm.models import __version__
from tsdfm.models.checkpoint import Checkpoint, load_checkpoint
from tsdfm.models.data.schema import METADATA_KEYS, TrajectoryBatch
from tsdfm.models.errors import ConfigError
from tsdfm.models.eval.metrics import unigram_entropy
from tsdfm.models.identity import CheckpointFiles
from tsdfm.models.navigator import navigate
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.teachers.check import step_check
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.shards import ShardInfo, write_shard


@dataclass(frozen=True)
class Provenance:
    """Identities of what made a dataset.

    ``teacher`` is what an adapter decided about a teacher of another family (its
    ``provenance.adapter``: family, vocabulary map, time input, whether its remote code was
    trusted and the sha256 of each of its ``.py`` files), None for this project's format; the
    manifest records it. Its identity already covers it, so it is not compared and not part
    of the shards' metadata.
    """

    teacher_identity: str
    compass_identity: str | None
    tokenizer_identity: str | None
    fingerprint: str
    teacher: dict | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """The identities and the fingerprint, as every shard's metadata holds them."""
        return {
            "teacher_identity": self.teacher_identity,
            "compass_identity": self.compass_identity,
            "tokenizer_identity": self.tokenizer_identity,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class ShardResult:
    """What a worker returns for a committed shard."""

    info: ShardInfo
    counters: dict[str, float]
    stats: dict[str, Any]


def tokenizer_identity(ckpt: Checkpoint | CheckpointFiles) -> str | None:
    """``sha256:<hex>`` of the checkpoint's tokenizer.json, or None without one."""
    path = ckpt.directory / "tokenizer.json"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def open_models(
    cfg: BuildConfig,
    open_teacher: Callable[[str], Any],
    open_compass: Callable[[str], Any],
) -> tuple[Any, Any]:
    """Teacher and compass of ``cfg`` as ``open_teacher(spec)`` / ``open_compass(spec)`` give
    them, checked.

    The compass is a checkpoint, or for ``exact`` / ``exact-ratio`` the synthetic language's
    own likelihood (:class:`tsdfm.models.compass.ExactScorer`, the oracle of research
    controls). A compass must read the teacher's states and have learned from them
    (:func:`tsdfm.models.compass.check_compass_for_teacher`).

    Args:
        cfg: the build config.
        open_teacher: e.g. :func:`tsdfm.models.teachers.open_teacher` on a device (the
            actors), or :func:`tsdfm.models.teachers.teacher_files` (the driver: files and
            identities only, no module), with cfg's teacher format and remote-code consent.
        open_compass: likewise :func:`tsdfm.models.checkpoint.load_checkpoint` or
            :func:`tsdfm.models.identity.checkpoint_files` for the compass role.
    """
    from tsdfm.models.compass import EXACT_SCORERS, ExactScorer, check_compass_for_teacher

    teacher = open_teacher(cfg.teacher)
    compass = None
    if cfg.compass in EXACT_SCORERS:
        compass = ExactScorer.for_teacher(cfg.compass, teacher)
    elif cfg.compass is not None:
        compass = open_compass(cfg.compass)
        check_compass_for_teacher(compass, teacher, cfg.allow_teacher_mismatch)
    sel = cfg.navigator.selection
    if sel in ("token-softmax", "tilt") and any(cfg.navigator.shaped_segments()):
        head = getattr(getattr(getattr(compass, "config", None), "backbone", None), "head", None)
        if head != "tokens":
            raise ConfigError(
                f"--selection {sel} needs per-position log-ratios, which the compass "
                f"{cfg.compass!r} does not have; train a token-ratio compass (compass train "
                "--head tokens) or use --selection softmax"
            )
    return teacher, compass


def load_models(
    cfg: BuildConfig, device: str, teacher_identity: str | None = None
) -> tuple[Checkpoint, Any]:
    """Load teacher and compass onto ``device`` (see :func:`open_models`), at cfg's precision.

    ``teacher_identity``: the identity the teacher's files must have; checked before its
    network is built, so remote code that differs from what the driver hashed never runs.
    """
    from tsdfm.models.teachers import open_teacher

    def teacher(spec: str) -> Checkpoint:
        return open_teacher(
            spec,
            device,
            "teacher",
            cfg.teacher_format,
            cfg.trust_remote_code,
            identity=teacher_identity,
        )

    teacher, compass = open_models(
        cfg, teacher, lambda spec: load_checkpoint(spec, device, role="compass")
    )
    for ck in (teacher, compass):
        if hasattr(getattr(ck, "model", None), "set_precision"):
            ck.model.set_precision(cfg.precision)
    if cfg.compile:
        compile_models(teacher, compass)
    return teacher, compass


def compile_models(*checkpoints: Any) -> None:
    """``torch.compile`` the forward of every loaded model among ``checkpoints`` in place
    (parameter names and identities unchanged; shapes are marked dynamic, so batches of
    other sizes do not recompile). The first forward of each shape compiles: minutes on a
    CPU, and a C compiler is needed there; a missing one fails here, in one line."""
    import shutil

    if not torch.cuda.is_available() and not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        raise ConfigError(
            "--compile on CPU needs a C compiler (cc, gcc or clang) for torch.compile's "
            "kernels; install one or build without --compile"
        )
    for ck in checkpoints:
        model = getattr(ck, "model", None)
        if isinstance(model, torch.nn.Module):
            model.compile(dynamic=True)


# CPU estimate of one row's peak activation bytes (float32): one layer's working set (q, k,
# v, attention output and the MLP: (4 + mlp_ratio)·d per position, and the attention scores,
# H heads × L keys per position) and the output head (logits, their softmax and one
# temporary: 3·V per position, which also covers the navigator's cached logits). Layers run
# one after another under no_grad, so one layer is live at a time; weights are not counted.
def estimate_row_bytes(model: Any) -> int:
    """Peak activation bytes of one row of ``model``'s forward, from its backbone shape."""
    b = getattr(getattr(model, "config", None), "backbone", None)
    if b is None or not hasattr(b, "d_model"):
        raise ConfigError(
            f"--max-memory on CPU estimates memory from the model's shape, which "
            f"{type(model).__name__} does not expose; pass a fixed --batch-size instead"
        )
    L = b.max_len
    per_position = (4 + b.mlp_ratio) * b.d_model + b.n_heads * L + 3 * b.vocab_out
    return 4 * L * per_position


def measure_row_bytes(model: Any, seq_len: int, vocab: int, device: str) -> int:
    """Peak activation bytes of one row of ``model``'s forward on CUDA: a probe forward of
    8 rows, peak allocated minus what was allocated before, per row."""
    rows = 8
    x = torch.randint(0, vocab, (rows, seq_len), device=device)
    t = torch.full((rows,), 0.5, device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward = getattr(model, "backbone", model)  # fp32, any head: an upper bound for bf16
    with torch.no_grad():
        forward(x, t)
    torch.cuda.synchronize(device)
    return max(1, -(-(torch.cuda.max_memory_allocated(device) - before) // rows))


def fit_batch(cfg: BuildConfig, teacher: Any, compass: Any, device: str) -> tuple[int, int]:
    """(batch size, activation bytes per trajectory) for ``cfg.max_memory`` GiB.

    A trajectory takes K rows of every teacher and compass forward, so it needs K times the
    larger of their per-row peaks; the batch is the most trajectories that fit, at most
    ``cfg.batch_size``. ConfigError when not even one fits.
    """
    K = cfg.navigator.candidates
    models = [teacher.model]
    if isinstance(getattr(compass, "model", None), torch.nn.Module):
        models.append(compass.model)
    tcfg = teacher.config
    if str(device).startswith("cuda"):
        vocab = tcfg.vocab_size  # data tokens: valid input ids of every source
        per_row = max(measure_row_bytes(m, tcfg.seq_len, vocab, device) for m in models)
    else:
        per_row = max(estimate_row_bytes(m) for m in models)
    per_trajectory = K * per_row
    budget = int(cfg.max_memory * 2**30)
    if per_trajectory > budget:
        raise ConfigError(
            f"--max-memory {cfg.max_memory:g} GiB fits no trajectory: one needs "
            f"{per_trajectory / 2**30:.3g} GiB of activations (K={K} rows); raise --max-memory"
        )
    return min(cfg.batch_size, budget // per_trajectory), per_trajectory


def adapter_record(teacher: Any) -> dict | None:
    """What the adapter decided about ``teacher`` (its config's ``provenance.adapter``) and
    the solver vocabulary it gives (``solver``: vocab_size V, mask_token_id, seq_len, source),
    or None for this project's own format."""
    adapter = teacher.config.provenance.get("adapter")
    if not isinstance(adapter, dict):
        return None
    cfg = teacher.config
    solver = {
        "vocab_size": cfg.vocab_size,
        "mask_token_id": cfg.mask_token_id,
        "seq_len": cfg.seq_len,
        "source": cfg.source,
    }
    return {**adapter, "solver": solver}


def provenance(cfg: BuildConfig, teacher: Any, compass: Any) -> Provenance:
    """Identities of ``teacher`` and ``compass`` (loaded or as files) and the fingerprint."""
    compass_id = compass.identity if compass is not None else None
    return Provenance(
        teacher_identity=teacher.identity,
        compass_identity=compass_id,
        tokenizer_identity=tokenizer_identity(teacher),
        fingerprint=cfg.fingerprint(teacher.identity, compass_id),
        teacher=adapter_record(teacher),
    )


def identify(cfg: BuildConfig) -> Provenance:
    """The provenance of a build of ``cfg``, from the checkpoint files: no model is built.

    Every check that does not need the module runs (roles, pickles, tokenizer, the teacher's
    family, remote code only with ``trust_remote_code``, compass fits and learned from the
    teacher), so a mismatch fails before a worker starts.
    """
    from tsdfm.models.identity import checkpoint_files
    from tsdfm.models.teachers import teacher_files

    def teacher(spec: str):
        return teacher_files(spec, "teacher", cfg.teacher_format, cfg.trust_remote_code)

    return provenance(
        cfg, *open_models(cfg, teacher, lambda spec: checkpoint_files(spec, "compass"))
    )


class ShardBuilder:
    """Builds shards of one plan on one device; loads teacher and compass once.

    Args:
        cfg: the build config, recorded as given in every shard's metadata.
        root: dataset root (local path or fsspec URL).
        device: "cpu" or "cuda[:i]".
        teacher: where to load the teacher from instead of ``cfg.teacher`` (e.g. ``verify
            --replay`` of a dataset whose checkpoints moved since); the identity decides.
        compass: likewise for ``cfg.compass``.
        planned: what the driver computed from the files (:func:`identify`); a builder
            whose checkpoints give another fingerprint refuses to start (a node that sees
            other files than the driver did would write another dataset's shards).
        teacher_identity: without ``planned``, the identity the teacher's files must have
            before its network (and any remote code) is loaded: ``verify --replay`` passes
            the one the shards record.
    """

    def __init__(
        self,
        cfg: BuildConfig,
        root: str,
        device: str = "cpu",
        *,
        teacher: str | None = None,
        compass: str | None = None,
        planned: Provenance | None = None,
        teacher_identity: str | None = None,
    ):
        self.cfg = cfg
        self.root = root
        self.device = device
        where = replace(
            cfg,
            teacher=teacher or cfg.teacher,
            compass=compass if compass is not None else cfg.compass,
        )
        expected = planned.teacher_identity if planned is not None else teacher_identity
        self.teacher, self.compass = load_models(where, device, expected)
        self.provenance = provenance(cfg, self.teacher, self.compass)
        if planned is not None and self.provenance != planned:
            here, there = self.provenance.to_dict(), planned.to_dict()
            diff = "; ".join(
                f"{k} {here[k]} here, {there[k]} on the driver" for k in here if here[k] != there[k]
            )
            raise ConfigError(
                f"the checkpoints this worker loaded are not the driver's ({diff}): every node "
                "must see the same teacher and compass files (a shared path, or a Hub id "
                "pinned @revision)"
            )
        # one denoising step through the teacher before any shard: normalised p over data
        # tokens, never the mask or a special token (a CheckpointError names what fails)
        self.preflight = step_check(self.teacher)
        self.scorer = None
        if isinstance(self.compass, Checkpoint):
            from tsdfm.models.compass import CompassScorer

            self.scorer = CompassScorer.from_checkpoint(self.compass)
        elif self.compass is not None:
            self.scorer = self.compass  # the exact scorer
        self.batch_size, self.trajectory_bytes = cfg.batch_size, None
        if cfg.max_memory is not None:
            self.batch_size, self.trajectory_bytes = fit_batch(
                cfg, self.teacher, self.compass, device
            )

    def metadata(self, index: int) -> dict:
        meta = {
            "schema_version": self.cfg.schema_version,
            "package_version": __version__,
            "config": self.cfg.to_dict(),
            **self.provenance.to_dict(),
            "shard": index,
            "num_shards": self.cfg.shards,
            "shard_seed": self.cfg.trajectory_seed(index * self.cfg.trajectories_per_shard),
        }
        assert set(meta) == METADATA_KEYS, sorted(set(meta) ^ METADATA_KEYS)
        return meta

    @torch.no_grad()
    def build(self, index: int, tick: Callable[[int], None] | None = None) -> ShardResult:
        """Navigate and write shard ``index``; returns its info, counters and stats.

        ``tick(n)`` hears of every batch of ``n`` trajectories navigated (the build's bar
        moves per batch, not per shard); the shard is written after the last one.
        """
        cfg = self.cfg
        if not 0 <= index < cfg.shards:
            raise ValueError(f"shard {index} outside the plan of {cfg.shards} shards")
        start_time = time.perf_counter()
        teacher = self.teacher
        tcfg = teacher.config
        first = index * cfg.trajectories_per_shard
        batches, totals = [], _Totals()
        for lo in range(0, cfg.trajectories_per_shard, self.batch_size):
            n = min(self.batch_size, cfg.trajectories_per_shard - lo)
            ids = torch.arange(first + lo, first + lo + n, dtype=torch.long)
            seeds = trajectory_seed(cfg.seed, ids)
            res = navigate(
                teacher.model,
                self.scorer,
                tcfg.path(),
                seeds.to(self.device),
                tcfg.seq_len,
                cfg.navigator,
            )
            final = res.states[:, -1].cpu()
            batches.append(
                TrajectoryBatch(
                    trajectory_id=ids.numpy(),
                    shard=index,
                    seed=seeds.numpy(),
                    times=res.times.cpu().numpy(),
                    states=res.states.cpu().numpy(),
                    energies=res.energies.cpu().numpy(),
                    shaped=res.shaped.numpy(),
                    chosen=res.chosen.cpu().numpy(),
                    text=self._decode(final),
                )
            )
            totals.add(res, final, tcfg.vocab_size)
            if tick is not None:
                tick(n)
        info = write_shard(self.root, index, cfg.shards, batches, self.metadata(index))
        counters = totals.counters()
        counters["build_seconds"] = time.perf_counter() - start_time
        stats = totals.stats()
        if cfg.max_memory is not None:  # what the memory budget chose, in the manifest
            stats["batch_size"] = self.batch_size
            stats["activation_bytes_per_trajectory"] = self.trajectory_bytes
        return ShardResult(info, counters, stats)

    def _decode(self, final: torch.Tensor) -> list[str | None] | None:
        tok = self.teacher.tokenizer
        if tok is None or not self.cfg.stores_text:
            return None
        return tok.decode_batch(final.tolist(), skip_special_tokens=False)


class _Totals:
    """Counters and energy statistics accumulated over a shard's batches."""

    def __init__(self) -> None:
        self.c = {
            "trajectories": 0,
            "candidates": 0,
            "energy_calls": 0,
            "energy_rows": 0,
            "teacher_forward_calls": 0,
            "teacher_row_forwards": 0,
            "teacher_forward_seconds": 0.0,
            "compass_seconds": 0.0,
        }
        self.chosen_sum = 0.0
        self.candidate_sum = 0.0
        self.shaped_rows = 0
        self.entropy_sum = 0.0

    def add(self, res, final: torch.Tensor, vocab_size: int) -> None:
        ex = res.counters.extra
        B = final.shape[0]
        self.c["trajectories"] += B
        self.c["candidates"] += ex["candidates"]
        self.c["energy_calls"] += ex["compass_calls"]
        self.c["energy_rows"] += ex["compass_rows"]
        self.c["teacher_forward_calls"] += res.counters.forward_calls
        self.c["teacher_row_forwards"] += res.counters.row_forwards
        self.c["teacher_forward_seconds"] += res.counters.forward_seconds
        self.c["compass_seconds"] += ex["compass_seconds"]
        shaped = res.shaped.to(res.energies.device)
        if shaped.any():
            e = res.energies[:, shaped].double().cpu()  # (B, S', K)
            kept = res.kept_energies[:, shaped].double().cpu()  # (B, S')
            self.chosen_sum += float(kept.sum())
            self.candidate_sum += float(e.mean(dim=2).sum())
            self.shaped_rows += kept.numel()
        self.entropy_sum += float(unigram_entropy(final, vocab_size).sum())

    def counters(self) -> dict[str, float]:
        return dict(self.c)

    def stats(self) -> dict[str, Any]:
        n = self.c["trajectories"]
        s = {"mean_final_unigram_entropy": self.entropy_sum / max(n, 1)}
        if self.shaped_rows:
            chosen = self.chosen_sum / self.shaped_rows
            candidate = self.candidate_sum / self.shaped_rows
            s.update(
                {
                    "mean_chosen_energy": chosen,
                    "mean_candidate_energy": candidate,
                    "energy_gain": candidate - chosen,
                    "shaped_segments": self.shaped_rows,
                }
            )
        return s
