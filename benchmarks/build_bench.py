"""Pipeline benchmark: where actor time goes, the cost of K, worker scaling, bytes per row.

    python benchmarks/build_bench.py            # bundled teacher + compass, CPU, ~10 minutes
    python benchmarks/build_bench.py --quick    # smaller plan
    python benchmarks/build_bench.py --device cuda --precision bf16 \
        --trajectories-per-shard 256 --out docs/results/build-gpu   # GPU actors, one per GPU

Measures (targets from issue 4; measured, never asserted):
- share of actor wall time in teacher + compass forward passes (target ≥ 90%);
- wall time of K=8 over K=1 at equal trajectories (target ≤ 8.4x);
- throughput of 2 CPU workers over 1 (target ≥ 1.8x on 2 cores);
- Parquet bytes per trajectory against the information minimum (target ≤ 1.5x): the final
  tokens at ⌈log2 V⌉ bits each plus, for the mask source, the segment in which each position
  was revealed at ⌈log2 (S+1)⌉ bits, plus 16 bits per stored candidate energy (K × S when
  K > 1; issue 18), as docs/results/storage.md counts it.

On CUDA the runs use 1 worker and, when the machine has more than one GPU, one per GPU (one
actor per GPU); trajectories per GPU-hour = 3600 × the 1-worker traj/s.

Results: docs/results/build.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_io import column_bytes, write_results

from tsdfm.models.checkpoint import bundled_path, load_checkpoint
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.pipeline.build import run_build
from tsdfm.pipeline.config import BuildConfig


def _build(cfg: BuildConfig, workers: int, tmp: Path, name: str, device: str) -> dict:
    root = tmp / name
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_build(cfg, str(root), device=device, num_workers=workers)
    wall = time.perf_counter() - t0
    c = summary.totals["counters"]
    rows = summary.totals["rows"]
    columns = column_bytes(sorted((root / "data").glob("*.parquet")))
    return {
        "name": name,
        "workers": workers,
        "K": cfg.navigator.candidates,
        "trajectories": rows,
        "driver_wall_seconds": wall,
        "execute_seconds": summary.execution.seconds,
        "trajectories_per_second": rows / summary.execution.seconds,
        "actor_build_seconds": c["build_seconds"],
        "teacher_forward_seconds": c["teacher_forward_seconds"],
        "compass_seconds": c["compass_seconds"],
        "forward_share": (c["teacher_forward_seconds"] + c["compass_seconds"]) / c["build_seconds"],
        "teacher_row_forwards_per_trajectory": c["teacher_row_forwards"] / rows,
        "bytes": summary.totals["bytes"],
        "bytes_per_trajectory": summary.totals["bytes"] / rows,
        "column_bytes_per_trajectory": {k: v / rows for k, v in columns.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher", default=str(bundled_path("teacher")))
    ap.add_argument("--compass", default=str(bundled_path("compass")))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="actor kind (default: cpu)"
    )
    ap.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast on CUDA"
    )
    ap.add_argument(
        "--trajectories-per-shard",
        type=int,
        default=None,
        help="rows per shard, also the batch size (default: 32, --quick 8)",
    )
    ap.add_argument("--out", default="docs/results/build")
    args = ap.parse_args()
    if args.precision == "bf16" and args.device != "cuda":
        sys.exit("--precision bf16 needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda but torch sees no GPU on this machine")

    teacher = load_checkpoint(args.teacher)
    V, L = teacher.config.vocab_size, teacher.config.seq_len
    shards, per = (4, 8) if args.quick else (4, 32)
    per = args.trajectories_per_shard or per
    # CPU: one actor per core, 1 and 2 of them; CUDA: one actor per GPU, 1 and all GPUs.
    many = 2 if args.device == "cpu" else torch.cuda.device_count()
    nav1 = NavigatorConfig(8, 1024, 1)
    nav8 = NavigatorConfig(8, 1024, 8)
    base = dict(
        teacher=args.teacher,
        shards=shards,
        trajectories_per_shard=per,
        batch_size=per,
        seed=0,
        precision=args.precision,
    )
    runs = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for k, nav, compass in ((1, nav1, None), (8, nav8, args.compass)):
            cfg = BuildConfig(**base, compass=compass, navigator=nav)
            for workers in (1, many) if many > 1 else (1,):
                name = f"K={k}, {workers} worker" + ("s" if workers > 1 else "")
                runs.append(_build(cfg, workers, tmp, name, args.device))
    S = nav1.student_steps
    info_bits = L * math.ceil(math.log2(V)) + L * math.ceil(math.log2(S + 1))
    info_bytes = info_bits / 8
    info_bytes_K8 = info_bytes + 2 * nav8.candidates * S  # K × S energies at 16 bits
    k1, k8 = (next(r for r in runs if r["K"] == k and r["workers"] == 1) for k in (1, 8))
    k1w, k8w = (next((r for r in runs if r["K"] == k and r["workers"] > 1), None) for k in (1, 8))
    figures = {
        "forward_share_K1": k1["forward_share"],
        "forward_share_K8": k8["forward_share"],
        "cost_K8_over_K1": k8["execute_seconds"] / k1["execute_seconds"],
        "many_workers": many if many > 1 else None,
        "speedup_many_workers_K1": k1w["trajectories_per_second"] / k1["trajectories_per_second"]
        if k1w
        else None,
        "speedup_many_workers_K8": k8w["trajectories_per_second"] / k8["trajectories_per_second"]
        if k8w
        else None,
        "trajectories_per_worker_hour_K1": 3600 * k1["trajectories_per_second"],
        "trajectories_per_worker_hour_K8": 3600 * k8["trajectories_per_second"],
        "information_minimum_bytes": info_bytes,
        "information_minimum_bytes_K8": info_bytes_K8,
        "bytes_over_minimum_K1": k1["bytes_per_trajectory"] / info_bytes,
        "bytes_over_minimum_K8": k8["bytes_per_trajectory"] / info_bytes_K8,
    }
    device = {
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads_per_worker": 1 if args.device == "cpu" else None,
        "python": platform.python_version(),
        "precision": args.precision,
    }
    if args.device == "cuda":
        device["gpu"] = torch.cuda.get_device_name(0)
        device["gpus"] = torch.cuda.device_count()
    result = {
        "benchmark": "build",
        "command": "python " + " ".join(sys.argv),
        "teacher": teacher.identity,
        "plan": {"shards": shards, "trajectories_per_shard": per, "S": 8, "N": 1024},
        "device": device,
        "runs": runs,
        "figures": figures,
    }
    print(write_results(args.out, result, _markdown(result)).read_text())


def _markdown(r: dict) -> str:
    f = r["figures"]
    lines = [
        "# Build pipeline benchmark",
        "",
        f"Teacher `{r['teacher'][:23]}…`, plan {r['plan']}, device {r['device']}.",
        "",
        "| run | trajectories | traj/s | forward share | teacher forwards/traj | bytes/traj |",
        "|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['name']} | {run['trajectories']} | {run['trajectories_per_second']:.3f} | "
            f"{run['forward_share']:.1%} | {run['teacher_row_forwards_per_trajectory']:.0f} | "
            f"{run['bytes_per_trajectory']:.0f} |"
        )
    lines += [
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| forward share of actor time (K=1 / K=8) | {f['forward_share_K1']:.1%} / "
        f"{f['forward_share_K8']:.1%} | ≥ 90% |",
        f"| cost of K=8 over K=1 | {f['cost_K8_over_K1']:.2f}x | ≤ 8.4x |",
        _speedup_line(f),
        f"| trajectories per worker-hour, 1 worker (K=1 / K=8) | "
        f"{f['trajectories_per_worker_hour_K1']:,.0f} / "
        f"{f['trajectories_per_worker_hour_K8']:,.0f} | |",
        "| bytes per trajectory over the information minimum "
        f"({f['information_minimum_bytes']:.0f} B / {f['information_minimum_bytes_K8']:.0f} B) "
        f"(K=1 / K=8) | {f['bytes_over_minimum_K1']:.2f}x / {f['bytes_over_minimum_K8']:.2f}x"
        " | ≤ 1.5x |",
        "",
        "Compressed bytes per trajectory by column (column chunks only; the rest of a file is "
        "Parquet footer, page index and the `tsdfm` metadata):",
        "",
        "| run | " + " | ".join(r["runs"][0]["column_bytes_per_trajectory"]) + " |",
        "|---|" + "---|" * len(r["runs"][0]["column_bytes_per_trajectory"]),
        *[
            f"| {run['name']} | "
            + " | ".join(f"{v:.0f}" for v in run["column_bytes_per_trajectory"].values())
            + " |"
            for run in r["runs"]
        ],
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


def _speedup_line(f: dict) -> str:
    if f["many_workers"] is None:
        return "| several workers over 1 | not measured (one worker only) | ≥ 1.8x for 2 |"
    return (
        f"| {f['many_workers']} workers over 1 (K=1 / K=8) | {f['speedup_many_workers_K1']:.2f}x"
        f" / {f['speedup_many_workers_K8']:.2f}x | ≥ 1.8x for 2 |"
    )


if __name__ == "__main__":
    main()
