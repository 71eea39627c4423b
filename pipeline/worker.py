"""Build one shard: navigate its trajectories in batches and write them as Parquet (no Ray).

:class:`ShardBuilder` loads the teacher and compass once and builds any shard of the plan; the
Ray actor in ``tsdfm.pipeline.executor`` is a thin wrapper around it. A shard is a pure function of
(config, shard index): trajectory i has seed ``seed · 2^32 + i`` and all randomness is
counter-based, so a retried shard has the same bytes on the same hardware and software.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from tsdfm.models import __version__
from tsdfm.models.checkpoint import Checkpoint, load_checkpoint
from tsdfm.models.data.schema import METADATA_KEYS, SCHEMA_VERSION, TrajectoryBatch
from tsdfm.models.eval.metrics import unigram_entropy
from tsdfm.models.navigator import navigate
from tsdfm.models.rng import trajectory_seed
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.shards import ShardInfo, write_shard


@dataclass(frozen=True)
class Provenance:
    """Identities of what made a dataset."""

    teacher_identity: str
    compass_identity: str | None
    tokenizer_identity: str | None
    fingerprint: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ShardResult:
    """What a worker returns for a committed shard."""

    info: ShardInfo
    counters: dict[str, float]
    stats: dict[str, Any]


def tokenizer_identity(ckpt: Checkpoint) -> str | None:
    path = ckpt.directory / "tokenizer.json"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def load_models(cfg: BuildConfig, device: str) -> tuple[Checkpoint, Any]:
    """Load teacher and compass, check that they fit together.

    The compass is a checkpoint, or for ``exact`` / ``exact-ratio`` the synthetic language's
    own likelihood (:class:`tsdfm.models.compass.ExactScorer`, the oracle of research controls).
    """
    from tsdfm.models.compass import EXACT_SCORERS, ExactScorer

    teacher = load_checkpoint(cfg.teacher, device, role="teacher")
    compass = None
    if cfg.compass in EXACT_SCORERS:
        compass = ExactScorer.for_teacher(cfg.compass, teacher)
    elif cfg.compass is not None:
        from tsdfm.models.compass import check_compass_for_teacher

        compass = load_checkpoint(cfg.compass, device, role="compass")
        check_compass_for_teacher(compass, teacher, cfg.allow_teacher_mismatch)
    for ck in (teacher, compass):
        if hasattr(getattr(ck, "model", None), "set_precision"):
            ck.model.set_precision(cfg.precision)
    return teacher, compass


def provenance(cfg: BuildConfig, teacher: Checkpoint, compass: Any) -> Provenance:
    compass_id = compass.identity if compass is not None else None
    return Provenance(
        teacher_identity=teacher.identity,
        compass_identity=compass_id,
        tokenizer_identity=tokenizer_identity(teacher),
        fingerprint=cfg.fingerprint(teacher.identity, compass_id),
    )


class ShardBuilder:
    """Builds shards of one plan on one device.

    Args:
        cfg: the build config.
        root: dataset root (local path or fsspec URL).
        device: "cpu" or "cuda[:i]".
    """

    def __init__(self, cfg: BuildConfig, root: str, device: str = "cpu"):
        self.cfg = cfg
        self.root = root
        self.device = device
        self.teacher, self.compass = load_models(cfg, device)
        self.provenance = provenance(cfg, self.teacher, self.compass)
        self.scorer = None
        if isinstance(self.compass, Checkpoint):
            from tsdfm.models.compass import CompassScorer

            self.scorer = CompassScorer.from_checkpoint(self.compass)
        elif self.compass is not None:
            self.scorer = self.compass  # the exact scorer

    def metadata(self, index: int) -> dict:
        meta = {
            "schema_version": SCHEMA_VERSION,
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
    def build(self, index: int) -> ShardResult:
        """Navigate and write shard ``index``; returns its info, counters and stats."""
        cfg = self.cfg
        if not 0 <= index < cfg.shards:
            raise ValueError(f"shard {index} outside the plan of {cfg.shards} shards")
        start_time = time.perf_counter()
        teacher = self.teacher
        tcfg = teacher.config
        first = index * cfg.trajectories_per_shard
        batches, totals = [], _Totals()
        for lo in range(0, cfg.trajectories_per_shard, cfg.batch_size):
            n = min(cfg.batch_size, cfg.trajectories_per_shard - lo)
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
        info = write_shard(self.root, index, cfg.shards, batches, self.metadata(index))
        counters = totals.counters()
        counters["build_seconds"] = time.perf_counter() - start_time
        return ShardResult(info, counters, totals.stats())

    def _decode(self, final: torch.Tensor) -> list[str | None] | None:
        tok = self.teacher.tokenizer
        if tok is None:
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
            kept = e.gather(2, res.chosen[:, shaped].cpu().unsqueeze(2)).squeeze(2)
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
