"""Scale benchmark: a teacher of MDLM's shape through the real build path, on CPU.

    python benchmarks/scale.py            # 12 layers, d = 768, L = 1,024, V = 50,257; ~10 min
    python benchmarks/scale.py --quick    # a small shape, seconds (what the test runs)

A randomly initialised mask-source teacher of MDLM's shape (12 layers, d_model 768, 12 heads,
L = 1,024, GPT-2's 50,257 tokens plus [MASK]; ``tsdfm.models.flow_model.teacher_config``) and a
compass of proportionate size (half the width and half the layers, as the bundled pair;
``tsdfm.models.compass.compass_config``) are saved as checkpoints; then each arm (K = 1, and
K = 8 with τ = 0) builds one shard with the project's :class:`tsdfm.pipeline.worker.ShardBuilder`
(what every Ray actor runs: navigator, solver, Parquet writer) in a fresh process of its own,
under ``cProfile``. Measured per arm:

- seconds per row forward of teacher and compass (the build's own counters) and the FLOPs
  they stand for (:func:`forward_flops`), hence the achieved FLOP/s;
- the actor's time split into parts that add up to its build time: teacher forward, compass
  forward, the jump rule (``jump_step``), the rest of the navigator (cache copies, selection,
  bookkeeping), Parquet writing, the rest of the shard (decoding, statistics);
  the forward share is teacher + compass over the build time;
- peak resident memory of the actor process (``VmHWM``), after loading and at the end, and of
  a driver process doing what the build's driver does with the checkpoints
  (``tsdfm.pipeline.worker.identify``: read and hash the files, build no model);
- bytes per trajectory of the shard (the schema version the writer wrote), and per column.

Beside the arms: the jump rule alone on (1, L, V) logits, per step, for a step where few
positions move and for the last step (every masked position draws); Parquet writing of
1,024-token rows alone (the built rows repeated, per row); and the teacher row forwards per
trajectory of the production plan (N = 1,024, S = 8), counted by running the navigator with a
tiny model of the same L (the mask path's reveals, hence the forward count, do not depend on
the model). docs/results/scale.md turns these into an estimate of GPU-hours per 100k
trajectories; this script measures, it does not estimate.

Results: docs/results/scale.{json,md} (``--out`` to change; ``--quick`` writes scale-quick).
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from results_io import column_bytes, cpu_model, write_results

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """Teacher and compass shape, and the small plan the arms build."""

    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    compass_d_model: int
    compass_layers: int
    compass_heads: int
    student_steps: int
    teacher_steps: int
    trajectories: int
    count_steps: int  # N of the plan whose forwards per trajectory are counted (S = 8)


FULL = Shape(50257, 1024, 768, 12, 12, 384, 6, 6, 4, 8, 1, 1024)
QUICK = Shape(512, 64, 64, 2, 2, 32, 1, 1, 4, 8, 2, 64)


def forward_flops(params_matmul: int, n_layers: int, d_model: int, seq_len: int) -> int:
    """FLOPs of one row forward (one sequence of L tokens):

        2 · P_matmul · L  +  4 · n_layers · L² · d_model

    P_matmul counts the weights of every matrix multiply that each token passes through (the
    blocks' qkv, projection and MLP, and the output head; not the embedding table, a lookup,
    nor the conditioning MLP, run once per row); the second term is attention's QKᵀ and AV.
    """
    return 2 * params_matmul * seq_len + 4 * n_layers * seq_len**2 * d_model


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights of the per-token matrix multiplies of a Backbone (see :func:`forward_flops`)."""
    b = model.backbone
    n = sum(m.weight.numel() for blk in b.blocks for m in (blk.qkv, blk.proj, *blk.mlp[::2]))
    return n + b.out.weight.numel()


def _rss() -> dict[str, int]:
    """Current and peak resident bytes of this process (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "peak"] = int(rest.split()[0]) * 1024
    return out


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` tokens "t0" … plus [MASK] (random weights have
    no language; decoding 1,024 of them gives about 6 KB of text, GPT-2's BPE about 4.5 KB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["[MASK]"] = vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[MASK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["[MASK]"])
    return tok


def make_checkpoints(shape: Shape, where: Path) -> dict:
    """Save a random teacher and a compass for it; returns their paths, sizes and FLOPs."""
    from tsdfm.models.checkpoint import save_checkpoint
    from tsdfm.models.compass import compass_config
    from tsdfm.models.flow_model import CompassModel, FlowModel, teacher_config

    torch.manual_seed(0)
    tcfg = teacher_config(
        shape.vocab_size, shape.seq_len, d_model=shape.d_model, n_layers=shape.n_layers,
        n_heads=shape.n_heads,
    )  # fmt: skip
    teacher = FlowModel(tcfg)
    tok = word_tokenizer(shape.vocab_size)
    t_id = save_checkpoint(where / "teacher", teacher, tok)
    ccfg = compass_config(
        tcfg, shape.compass_d_model, shape.compass_layers, shape.compass_heads,
        provenance={"teacher_identity": t_id},
    )  # fmt: skip
    compass = CompassModel(ccfg)
    save_checkpoint(where / "compass", compass, tok)
    models = {}
    for name, m, cfg in (("teacher", teacher, tcfg), ("compass", compass, ccfg)):
        b = cfg.backbone
        pm = matmul_parameters(m)
        models[name] = {
            "path": str(where / name),
            "parameters": m.backbone.num_parameters(),
            "matmul_parameters": pm,
            "d_model": b.d_model,
            "n_layers": b.n_layers,
            "n_heads": b.n_heads,
            "flops_per_row_forward": forward_flops(pm, b.n_layers, b.d_model, shape.seq_len),
        }
    return models


# the parts of an actor's build time, by the functions cProfile times (cumulative seconds)
_PROFILED = {
    "navigate": ("models/navigator.py", "navigate"),
    "evaluate": ("models/solver.py", "_evaluate"),
    "jump_step": ("models/solver.py", "jump_step"),
    "score": ("models/navigator.py", "_score"),
    "write_shard": ("pipeline/shards.py", "write_shard"),
}


def _cumulative(stats: pstats.Stats) -> dict[str, float]:
    out = dict.fromkeys(_PROFILED, 0.0)
    for (file, _, func), (_, _, _, cum, _) in stats.stats.items():
        for key, (suffix, name) in _PROFILED.items():
            if func == name and file.replace(os.sep, "/").endswith(suffix):
                out[key] += cum
    return out


def actor_run(cfg_dict: dict, root: str, threads: int, jump_bench: bool) -> dict:
    """One actor's life in a fresh process: load the models, build shard 0, profile it."""
    torch.set_num_threads(threads)
    import tsdfm.pipeline.worker as worker
    from tsdfm.pipeline.config import BuildConfig
    from tsdfm.pipeline.worker import ShardBuilder

    cfg = BuildConfig.from_dict(cfg_dict)
    written = {}
    write_shard = worker.write_shard

    def keep(root, index, num_shards, batches, metadata, **kw):  # the rows, for _write_bench
        batches = list(batches)
        written.update(batches=batches, metadata=metadata)
        return write_shard(root, index, num_shards, batches, metadata, **kw)

    worker.write_shard = keep
    start = time.perf_counter()
    builder = ShardBuilder(cfg, root, "cpu")
    load_seconds = time.perf_counter() - start
    after_load = _rss()
    prof = cProfile.Profile()
    prof.enable()
    result = builder.build(0)
    prof.disable()
    end = _rss()
    cum = _cumulative(pstats.Stats(prof))
    c = result.counters
    build = c["build_seconds"]
    teacher, compass = c["teacher_forward_seconds"], c["compass_seconds"]
    jump = cum["jump_step"]
    navigate = cum["navigate"]
    write = cum["write_shard"]
    parts = {
        "teacher_forward": teacher,
        "compass_forward": compass,
        "jump_rule": jump,
        "navigator_other": navigate - teacher - compass - jump,
        "parquet_write": write,
        "shard_other": build - navigate - write,
    }
    out = {
        "load_seconds": load_seconds,
        "counters": c,
        "profile_cumulative_seconds": cum,
        "parts_seconds": parts,
        "shares": {k: v / build for k, v in parts.items()},
        "forward_share": (teacher + compass) / build,
        "memory": {
            "after_load_rss_bytes": after_load["rss"],
            "peak_rss_bytes": end["peak"],
        },
        "shard": {"rows": result.info.rows, "bytes": result.info.bytes, "path": result.info.path},
    }
    out["parquet"] = _write_bench(written["batches"], written["metadata"], cfg.seed)
    if jump_bench:
        out["jump_rule"] = _jump_bench(builder, cfg)
    return out


def _median_seconds(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _jump_bench(builder, cfg) -> dict:
    """The jump rule alone on (1, L, V) logits: a step of the production plan's N (few moves)
    and the last step (q = 1: every masked position draws over the whole vocabulary)."""
    from tsdfm.models.rng import CounterRNG
    from tsdfm.models.solver import jump_step

    tcfg = builder.teacher.config
    L, V, mask = tcfg.seq_len, tcfg.vocab_size, tcfg.mask_token_id
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, L, V, generator=g)
    x = torch.full((1, L), mask, dtype=torch.long)
    rng = CounterRNG(torch.tensor([7]))
    N = 1024  # a step of the production plan
    out = {}
    for name, q in (("first_step_of_N_1024", 1.0 / N), ("last_step", 1.0)):
        moved = int((jump_step(x, logits, q, rng, 0, mask) != x).sum())
        sec = _median_seconds(lambda q=q: jump_step(x, logits, q, rng, 0, mask))
        out[name] = {"q": q, "positions_moved": moved, "seconds": sec}
    last = out["last_step"]
    out["seconds_per_drawn_position"] = last["seconds"] / max(last["positions_moved"], 1)
    return out


def _tiled(batch, rows: int, seed: int):
    """The rows of ``batch`` repeated to ``rows`` rows, with ids 0.. and their seeds."""
    import numpy as np

    from tsdfm.models.data.schema import TrajectoryBatch
    from tsdfm.models.rng import trajectory_seed

    take = np.arange(rows) % len(batch.trajectory_id)
    ids = np.arange(rows, dtype=np.int64)
    text = None if batch.text is None else [batch.text[i] for i in take]
    return TrajectoryBatch(
        trajectory_id=ids, shard=0, seed=trajectory_seed(seed, ids), times=batch.times,
        states=batch.states[take], energies=batch.energies[take], shaped=batch.shaped,
        chosen=batch.chosen[take], text=text,
    )  # fmt: skip


def _metadata_v(meta: dict, version: int, rows: int) -> dict:
    config = {**meta["config"], "shards": 1, "trajectories_per_shard": rows}
    if "schema_version" in config:
        config["schema_version"] = version
    return {**meta, "schema_version": version, "config": config, "shard": 0, "num_shards": 1}


def _write_bench(batches: list, meta: dict, seed: int) -> dict:
    """Parquet writing alone, per schema version: the built rows (bytes per trajectory) and the
    rows repeated to 16 (seconds per row, in one shard)."""
    from tsdfm.models.data.schema import SCHEMA_VERSIONS
    from tsdfm.pipeline.shards import write_shard

    n = sum(len(b.trajectory_id) for b in batches)
    rows = 16
    big = _tiled(batches[0], rows, seed)
    out = {}
    for version in SCHEMA_VERSIONS:
        target = tempfile.mkdtemp(prefix="scale-write-")
        try:
            same = write_shard(target, 0, 1, batches, _metadata_v(meta, version, n))
            m = _metadata_v(meta, version, rows)
            sec = _median_seconds(lambda m=m, d=target: write_shard(d, 0, 1, [big], m))
            info = write_shard(target, 0, 1, [big], m)
        except Exception as e:  # a version this writer cannot produce is reported, not fatal
            out[f"v{version}"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            shutil.rmtree(target, ignore_errors=True)
        out[f"v{version}"] = {
            "bytes_per_trajectory": same.bytes / n,
            "rows_timed": rows,
            "seconds_per_row": sec / rows,
            "bytes_per_trajectory_16_rows": info.bytes / rows,
        }
    return out


def driver_run(cfg_dict: dict) -> dict:
    """What the build's driver does with the checkpoints: identify them from the files."""
    from tsdfm.pipeline.config import BuildConfig
    from tsdfm.pipeline.worker import identify

    start = time.perf_counter()
    identify(BuildConfig.from_dict(cfg_dict))
    return {"identify_seconds": time.perf_counter() - start, "peak_rss_bytes": _rss()["peak"]}


def count_forwards(shape: Shape, K: int) -> dict:
    """Teacher row forwards per trajectory of the plan S = 8, N = ``shape.count_steps``
    (1,024 in the full preset: the production plan), with a tiny model of the same L."""
    from tsdfm.models.flow_model import FlowModel, teacher_config
    from tsdfm.models.navigator import NavigatorConfig, navigate
    from tsdfm.models.rng import trajectory_seed

    torch.manual_seed(0)
    tiny = FlowModel(teacher_config(8, shape.seq_len, d_model=8, n_layers=1, n_heads=1)).eval()

    class Zero:  # a scorer of the right interface; its energies do not change the count
        name, identity = "zero", "zero"

        def energy(self, x, t):
            return torch.zeros(x.shape[0])

    nav = NavigatorConfig(8, shape.count_steps, K)
    seeds = trajectory_seed(0, torch.arange(4))
    res = navigate(tiny, Zero() if K > 1 else None, tiny.path, seeds, shape.seq_len, nav)
    c = res.counters
    return {
        "K": K,
        "trajectories": len(seeds),
        "teacher_row_forwards_per_trajectory": c.row_forwards / len(seeds),
        "compass_rows_per_trajectory": c.extra["compass_rows"] / len(seeds),
        "student_steps": 8,
        "teacher_steps": shape.count_steps,
    }


def _in_process(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned process (its own peak memory); return its result."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def run(shape: Shape, threads: int, tmp: Path) -> dict:
    from tsdfm.models.data.schema import SCHEMA_VERSION
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.pipeline.config import BuildConfig

    t0 = time.perf_counter()
    models = make_checkpoints(shape, tmp)  # in this process, whose memory is not measured
    make_seconds = time.perf_counter() - t0
    S, N, B = shape.student_steps, shape.teacher_steps, shape.trajectories
    arms = []
    for K in (1, 8):
        cfg = BuildConfig(
            teacher=models["teacher"]["path"],
            compass=models["compass"]["path"] if K > 1 else None,
            shards=1,
            trajectories_per_shard=B,
            batch_size=B,
            navigator=NavigatorConfig(S, N, K),
        )
        root = tmp / f"K{K}"
        arm = _in_process(actor_run, cfg.to_dict(), str(root), threads, K == 1)
        c = arm["counters"]
        arm["K"] = K
        arm["teacher_seconds_per_row_forward"] = (
            c["teacher_forward_seconds"] / c["teacher_row_forwards"]
        )
        arm["compass_seconds_per_row_forward"] = (
            c["compass_seconds"] / c["energy_rows"] if c["energy_rows"] else None
        )
        arm["teacher_row_forwards_per_trajectory"] = c["teacher_row_forwards"] / B
        arm["bytes_per_trajectory"] = arm["shard"]["bytes"] / B
        arm["column_bytes_per_trajectory"] = {
            k: v / B for k, v in column_bytes([root / arm["shard"]["path"]]).items()
        }
        arms.append(arm)
        if K == 8:
            driver = _in_process(driver_run, cfg.to_dict())
    teacher, compass = models["teacher"], models["compass"]
    per_row = arms[0]["teacher_seconds_per_row_forward"]
    per_row_c = arms[1]["compass_seconds_per_row_forward"]
    figures = {
        "teacher_seconds_per_row_forward": per_row,
        "compass_seconds_per_row_forward": per_row_c,
        "teacher_cpu_flops_per_second": teacher["flops_per_row_forward"] / per_row,
        "compass_cpu_flops_per_second": compass["flops_per_row_forward"] / per_row_c,
        "forward_share_K1": arms[0]["forward_share"],
        "forward_share_K8": arms[1]["forward_share"],
        "actor_peak_rss_bytes_K1": arms[0]["memory"]["peak_rss_bytes"],
        "actor_peak_rss_bytes_K8": arms[1]["memory"]["peak_rss_bytes"],
        "driver_peak_rss_bytes": driver["peak_rss_bytes"],
        "logits_bytes_per_row": shape.seq_len * shape.vocab_size * 4,
        "jump_rule_seconds_last_step": arms[0]["jump_rule"]["last_step"]["seconds"],
        "jump_rule_seconds_step_of_N_1024": arms[0]["jump_rule"]["first_step_of_N_1024"]["seconds"],
        "bytes_per_trajectory_K1": arms[0]["bytes_per_trajectory"],
        "bytes_per_trajectory_K8": arms[1]["bytes_per_trajectory"],
        "schema_version": SCHEMA_VERSION,
        "by_schema_version": {
            v: {
                **{
                    f"bytes_per_trajectory_K{a['K']}": a["parquet"][v].get("bytes_per_trajectory")
                    for a in arms
                },
                "write_seconds_per_row_K1": arms[0]["parquet"][v].get("seconds_per_row"),
                "write_seconds_per_row_K8": arms[1]["parquet"][v].get("seconds_per_row"),
            }
            for v in arms[0]["parquet"]
        },
    }
    production = [count_forwards(shape, K) for K in (1, 8)]
    return {
        "shape": asdict(shape),
        "models": models,
        "checkpoint_seconds": make_seconds,
        "arms": arms,
        "driver": driver,
        "production_forward_counts": production,
        "figures": figures,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small shape that runs in seconds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor (default 1)")
    ap.add_argument("--trajectories", type=int, default=None, help="rows of each arm's shard")
    ap.add_argument("--teacher-steps", type=int, default=None, help="N of the arms' plan")
    ap.add_argument("--student-steps", type=int, default=None, help="S of the arms' plan")
    ap.add_argument(
        "--exclusive",
        action="store_true",
        help="record that nothing else ran on the machine (default: it was shared)",
    )
    ap.add_argument("--out", default=None, help="results prefix (default docs/results/scale)")
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else FULL
    changes = {
        k: v
        for k, v in (
            ("trajectories", args.trajectories),
            ("teacher_steps", args.teacher_steps),
            ("student_steps", args.student_steps),
        )
        if v is not None
    }
    shape = Shape(**{**asdict(shape), **changes})
    out = args.out or str(ROOT / "docs/results" / ("scale-quick" if args.quick else "scale"))
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tsdfm-scale-") as d:
        result = run(shape, args.threads, Path(d))
    result = {
        "benchmark": "scale",
        "command": "python benchmarks/scale.py " + " ".join(argv or sys.argv[1:]),
        "preset": "quick" if args.quick else "full",
        "device": {
            "device": "cpu",
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads_per_actor": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "precision": "fp32",
            "machine_shared": not args.exclusive,
            "load_average_1min_start_end": [load_start[0], os.getloadavg()[0]],
        },
        **result,
    }
    print(write_results(out, result, markdown(result)).read_text())
    return result


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def markdown(r: dict) -> str:
    f, s, dev = r["figures"], r["shape"], r["device"]
    t, c = r["models"]["teacher"], r["models"]["compass"]
    shared = "shared with other jobs" if dev["machine_shared"] else "with nothing else running"
    lines = [
        "# Scale benchmark" + (" (quick preset)" if r["preset"] == "quick" else ""),
        "",
        f"Teacher: {t['n_layers']} layers, d_model {t['d_model']}, {t['n_heads']} heads, "
        f"L = {s['seq_len']}, V = {s['vocab_size']} + [MASK]: {t['parameters']:,} parameters, "
        f"{t['flops_per_row_forward'] / 1e9:,.1f} GFLOP per row forward. Compass: "
        f"{c['n_layers']} layers, d_model {c['d_model']}: {c['parameters']:,} parameters, "
        f"{c['flops_per_row_forward'] / 1e9:,.1f} GFLOP per row forward. Both randomly "
        "initialised, fp32.",
        "",
        f"Plan of each arm: 1 shard of {s['trajectories']} trajectories (batch "
        f"{s['trajectories']}), S = {s['student_steps']}, N = {s['teacher_steps']}, τ = 0; "
        f"one actor process, {dev['threads_per_actor']} thread(s), on a {dev['cores']}-core "
        f"{dev['cpu']} ({shared}; 1-min load average {dev['load_average_1min_start_end'][0]:.1f}"
        f" at the start, {dev['load_average_1min_start_end'][1]:.1f} at the end). Schema "
        f"v{f['schema_version']}.",
        "",
        "| arm | teacher s/row fwd | compass s/row fwd | teacher fwd | compass fwd | jump rule | "
        "navigator other | Parquet write | shard other | forward share | actor peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in r["arms"]:
        sh = a["shares"]
        cs = a["compass_seconds_per_row_forward"]
        lines.append(
            f"| K={a['K']} | {a['teacher_seconds_per_row_forward']:.3f} | "
            + (f"{cs:.3f}" if cs else "–")
            + " | "
            + " | ".join(
                f"{sh[k]:.1%}"
                for k in (
                    "teacher_forward",
                    "compass_forward",
                    "jump_rule",
                    "navigator_other",
                    "parquet_write",
                    "shard_other",
                )
            )
            + f" | **{a['forward_share']:.1%}** | {_mb(a['memory']['peak_rss_bytes'])} |"
        )
    jr = r["arms"][0]["jump_rule"]
    pq_ = r["arms"][0]["parquet"]
    lines += [
        "",
        "| figure | measured |",
        "|---|---|",
        f"| teacher achieved FLOP/s on this CPU | {f['teacher_cpu_flops_per_second'] / 1e9:.1f} "
        "GFLOP/s |",
        f"| compass achieved FLOP/s | {f['compass_cpu_flops_per_second'] / 1e9:.1f} GFLOP/s |",
        f"| actor peak RSS, K=1 / K=8 | {_mb(f['actor_peak_rss_bytes_K1'])} / "
        f"{_mb(f['actor_peak_rss_bytes_K8'])} |",
        f"| actor RSS after loading the models | "
        f"{_mb(r['arms'][0]['memory']['after_load_rss_bytes'])} |",
        f"| driver peak RSS (identify the checkpoints from their files) | "
        f"{_mb(f['driver_peak_rss_bytes'])} in {r['driver']['identify_seconds']:.1f} s |",
        f"| teacher logits per row (L × V float32) | {_mb(f['logits_bytes_per_row'])} |",
        f"| jump rule, one step of N = 1,024 ({jr['first_step_of_N_1024']['positions_moved']} "
        f"positions move) | {jr['first_step_of_N_1024']['seconds'] * 1e3:.1f} ms |",
        f"| jump rule, last step ({jr['last_step']['positions_moved']} positions draw) | "
        f"{jr['last_step']['seconds'] * 1e3:.1f} ms "
        f"({jr['seconds_per_drawn_position'] * 1e6:.0f} µs per position) |",
        f"| bytes per trajectory of the built shard, K=1 / K=8 (schema "
        f"v{f['schema_version']}, {s['trajectories']}-row shard) | "
        f"{f['bytes_per_trajectory_K1']:,.0f} / {f['bytes_per_trajectory_K8']:,.0f} |",
        *[
            f"| schema {v}: bytes per trajectory K=1 / K=8 (the same rows rewritten); Parquet "
            f"write of {s['seq_len']:,}-token rows (16 rows, one shard) K=1 / K=8 | "
            + (
                f"{g['bytes_per_trajectory_K1']:,.0f} / {g['bytes_per_trajectory_K8']:,.0f} B; "
                f"{g['write_seconds_per_row_K1'] * 1e3:.2f} / "
                f"{g['write_seconds_per_row_K8'] * 1e3:.2f} ms per row |"
                if g["bytes_per_trajectory_K1"] is not None
                and g["bytes_per_trajectory_K8"] is not None
                else "not written: " + str(pq_[v].get("error", "")) + " |"
            )
            for v, g in f["by_schema_version"].items()
        ],
        "",
        f"Teacher row forwards per trajectory of the plan S = 8, N = {s['count_steps']:,}, τ = 0"
        + (" (the production plan)" if s["count_steps"] == 1024 else "")
        + ", counted with a tiny model of the same L:",
        "",
        "| K | teacher row forwards / trajectory | compass rows / trajectory |",
        "|---|---|---|",
        *[
            f"| {p['K']} | {p['teacher_row_forwards_per_trajectory']:,.1f} | "
            f"{p['compass_rows_per_trajectory']:,.0f} |"
            for p in r["production_forward_counts"]
        ],
        "",
        "Bytes per column and trajectory: "
        + "; ".join(
            f"K={a['K']}: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in a["column_bytes_per_trajectory"].items())
            for a in r["arms"]
        ),
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
