"""Does the distillation trainer wait for data? Step time with the real loader vs from memory.

    python benchmarks/distill_loader.py                       # synthetic 8-shard dataset shaped
                                                              # like the bundled teacher's
    python benchmarks/distill_loader.py --data tsdfm-out/ds --init CKPT --device cuda
    python benchmarks/distill_loader.py --workers 0 1 2 4 --batch-size 512 --steps 200

For each loader worker count the same training step (``StudentStep``: forward, segment loss,
backward, clip, AdamW, EMA) runs ``--steps`` times fed by the real ``TrajectoryLoader``
(``datasets`` streaming of the Parquet shards, window shuffle, batching in worker processes),
and ``--steps`` times fed by the same batches already in memory. Reported per arm: mean step
time, examples/s, the time the step spent blocked on ``next(batch)`` (data wait) as a share of
step time, and the loader's overhead (loader step time / memory step time − 1). Target: data
wait < 5% of step time.

The loader verifies what it reads by default (``tsdfm.models.data.integrity``: the sha256 of every
shard against manifest.json when the dataset is opened, the dataset contract on every row
read). Its cost is measured apart, with and without verification: seconds to open the dataset,
and seconds to read one epoch of batches in the trainer's process (no training step).

``--processes 1 2`` also runs the real trainer (``tsdfm-pipeline distill``) under ``torchrun``
with each number of processes (DDP; gloo on the CPU, nccl on CUDA) on the same dataset and
global batch (``--batch-size`` × ``--grad-accum``, the accumulation split over the ranks), and
reads its own metrics.jsonl: the job's examples/s, and the data-wait share (the wait of the
rank that waited most in each step, over the step's wall time), after the warm-up steps.

Without ``--data`` the script writes a dataset of random mask-path trajectories with the
bundled teacher's shape (V=128, L=64, S=8) through ``tsdfm.pipeline.shards.write_shard``: the real
file layout, compression, metadata and manifest.json (the loader's cost does not depend on
what the tokens say, and they keep the contract the loader checks), and no Ray or teacher
rollouts. Results go to docs/results/distill_loader.{json,md}
with the device they ran on. Numbers are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tsdfm.models.checkpoint import bundled_path, load_checkpoint
from tsdfm.models.data.trajectories import LoaderConfig, TrajectoryLoader, open_trajectory_dataset
from tsdfm.models.train.distill import DistillConfig, StudentStep, build_student


def synthetic_dataset(root: Path, shards: int, rows: int, ckpt, steps: int, seed: int) -> Path:
    """Random mask-path trajectories of ``ckpt``'s shape, written as a real tsdfm dataset."""
    from tsdfm.models.data.schema import TrajectoryBatch
    from tsdfm.pipeline.manifest import Manifest
    from tsdfm.pipeline.shards import write_shard

    mc = ckpt.config
    V, L, M = mc.vocab_size, mc.seq_len, mc.mask_token_id
    rng = np.random.default_rng(seed)
    times = np.arange(steps + 1, dtype=np.float64) / steps
    fingerprint = "sha256:" + "0" * 64
    manifest = Manifest.create(
        str(root), {"num_shards": shards, "rows_per_shard": rows}, fingerprint
    )
    for i in range(shards):
        x_1 = rng.integers(0, V, size=(rows, L))
        reveal = rng.random((rows, L))  # position j is revealed once t ≥ reveal_j (κ(t) = t)
        states = np.stack([np.where(reveal <= t, x_1, M) for t in times], axis=1)
        states[:, -1] = x_1
        ids = np.arange(i * rows, (i + 1) * rows)
        batch = TrajectoryBatch(
            trajectory_id=ids,
            shard=i,
            seed=ids,
            times=times,
            states=states,
            energies=np.zeros((rows, steps, 1), np.float32),
            shaped=np.zeros(steps, bool),
            chosen=np.zeros((rows, steps), np.int16),
            text=None,
        )
        meta = {
            "teacher_identity": ckpt.identity,
            "fingerprint": fingerprint,
            "config": {"trajectories_per_shard": rows},
        }
        manifest.record_shard(write_shard(str(root), i, shards, [batch], meta))
    return root


def verification_cost(data: str, loader_cfg: LoaderConfig, init, repeats: int = 3) -> dict:
    """Seconds to open the dataset and to read one epoch of batches (0 workers, no training),
    with verification (the default) and without (``--no-verify``); the least of ``repeats``
    alternating runs of each."""
    from tsdfm.models.data.integrity import clear_digest_cache

    mc = init.config
    mask = mc.mask_token_id if mc.source == "mask" else None
    out: dict = {}
    for _ in range(repeats):
        for verify in (True, False):
            clear_digest_cache()  # every open hashes every shard again
            t0 = time.perf_counter()
            source = open_trajectory_dataset(data, verify=verify)
            source = source.with_vocabulary(mc.vocab_size, mask)
            opened = time.perf_counter() - t0
            loader = TrajectoryLoader(source, loader_cfg, 0, mc.input_vocab - 1)
            it = iter(loader)
            t0 = time.perf_counter()
            batches = 0
            while loader.state.epoch == 0:
                next(it)
                batches += 1
            read = time.perf_counter() - t0
            it.close()
            best = out.setdefault("verified" if verify else "unverified", {"batches": batches})
            best["open_seconds"] = min(opened, best.get("open_seconds", opened))
            best["epoch_read_seconds"] = min(read, best.get("epoch_read_seconds", read))
    files = open_trajectory_dataset(data, verify=False).files
    out["shard_bytes"] = sum(Path(f).stat().st_size for f in files if "://" not in f)
    v, u = out["verified"], out["unverified"]
    out["overhead"] = (v["open_seconds"] + v["epoch_read_seconds"]) / (
        u["open_seconds"] + u["epoch_read_seconds"]
    ) - 1
    out["ms_per_batch"] = 1000 * (v["epoch_read_seconds"] - u["epoch_read_seconds"]) / v["batches"]
    return out


def _device_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):  # other jobs on the machine slow every arm alike
        info["load_average_1min"] = os.getloadavg()[0]
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(cfg, init, device, batches, warmup: int, steps: int) -> dict:
    """Time ``steps`` training steps fed by ``batches`` (a zero-argument callable)."""
    model = build_student(init, cfg.seed).to(device).set_precision(cfg.precision)
    trainer = StudentStep(model, cfg, device)
    for s in range(warmup):
        trainer(s, batches)
    _sync(device)
    times, waits, examples = [], [], 0
    for s in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        m = trainer(s, batches)
        _sync(device)
        times.append(time.perf_counter() - t0)
        waits.append(m["data_wait"])
        examples += m["examples"]
    total = sum(times)
    return {
        "step_ms_mean": 1000 * total / steps,
        "step_ms_median": 1000 * statistics.median(times),
        "examples_per_second": examples / total,
        "data_wait_ms_mean": 1000 * sum(waits) / steps,
        "data_wait_share": sum(waits) / total,
    }


def ddp_arm(data: str, args, processes: int, accum: int, run_dir: Path) -> dict:
    """The real trainer under torchrun with ``processes`` ranks and ``accum`` micro-batches
    per step (the job's, split over the ranks): the job's step time, examples/s and data-wait
    share from its metrics.jsonl, after ``args.warmup`` steps."""
    workers = args.ddp_workers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={processes}", "-m", "tsdfm.pipeline.cli", "distill"]
    flags = {
        "data": data,
        "teacher": args.init,
        "out": str(run_dir),
        "train-steps": args.warmup + args.steps,
        "batch-size": args.batch_size,
        "grad-accum": accum,
        "streams": args.streams,
        "shuffle-buffer": args.shuffle_buffer,
        "num-workers": workers,
        "precision": args.precision,
        "device": args.device,
        "log-every": 1,
        "eval-every": 10**6,
        "checkpoint-every": 10**6,
        "eval-samples": 0,
        "heldout-trajectories": 0,
    }
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"torchrun with {processes} processes failed:\n{done.stderr[-2000:]}")
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    prev = {m["step"]: m["seconds"] for m in lines}
    timed = [m for m in lines if m["step"] > args.warmup]
    dts = [m["seconds"] - prev.get(m["step"] - 1, 0.0) for m in timed]
    total = sum(dts)
    return {
        "arm": f"torchrun, {processes} process(es), {workers} worker(s) each",
        "processes": processes,
        "workers": workers,
        "grad_accum": accum,
        "step_ms_mean": 1000 * total / len(timed),
        "examples_per_second": args.batch_size * accum * len(timed) / total,
        "data_wait_share": sum(m["data_wait_share"] * dt for m, dt in zip(timed, dts, strict=True))
        / total,
        "threads_per_process": threads,
        "job_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", help="Dataset folder or org/name[@rev]; default: synthetic")
    ap.add_argument("--init", default=str(bundled_path("teacher")))
    ap.add_argument("--shards", type=int, default=8, help="Synthetic dataset shards")
    ap.add_argument("--rows", type=int, default=2048, help="Synthetic trajectories per shard")
    ap.add_argument("--student-steps", type=int, default=8, help="Synthetic dataset S")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[],
        help="Also run the trainer under torchrun with these numbers of processes",
    )
    ap.add_argument(
        "--ddp-workers", type=int, default=2, help="Loader workers per process (--processes)"
    )
    ap.add_argument("--out", default="docs/results/distill_loader")
    args = ap.parse_args()
    device = torch.device(args.device)
    init = load_checkpoint(args.init, "cpu", role=("teacher", "student"))

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            data = str(
                synthetic_dataset(
                    Path(tmp) / "ds", args.shards, args.rows, init, args.student_steps, 0
                )
            )
            print(f"wrote synthetic dataset in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        source = open_trajectory_dataset(data)
        cfg = DistillConfig(
            data=data,
            init=args.init,
            out=tmp,
            steps=args.warmup + args.steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            streams=args.streams,
            shuffle_buffer=args.shuffle_buffer,
            precision=args.precision,
            device=str(device),
        )
        needed = (args.warmup + args.steps) * args.grad_accum
        loader_cfg: LoaderConfig = cfg.loader_config()
        max_id = init.config.input_vocab - 1
        verification = verification_cost(data, loader_cfg, init)
        print(
            "verification: open {:.3f}s vs {:.3f}s, one epoch read {:.3f}s vs {:.3f}s".format(
                verification["verified"]["open_seconds"],
                verification["unverified"]["open_seconds"],
                verification["verified"]["epoch_read_seconds"],
                verification["unverified"]["epoch_read_seconds"],
            ),
            file=sys.stderr,
        )

        # the memory arm: the same batches, collected first, already decoded and collated
        it = iter(TrajectoryLoader(source, loader_cfg, 0, max_id))
        memory = [next(it) for _ in range(needed)]
        it.close()
        if device.type == "cuda":
            memory = [b.pin_memory() for b in memory]
        feed = iter(memory)
        arms = [
            {
                "arm": "memory",
                "workers": None,
                **run_arm(cfg, init, device, lambda: next(feed), args.warmup, args.steps),
            }
        ]
        print(f"memory: {arms[-1]['step_ms_mean']:.2f} ms/step", file=sys.stderr)
        for workers in args.workers:
            loader = TrajectoryLoader(
                source, loader_cfg, workers, max_id, pin_memory=device.type == "cuda"
            )
            it = iter(loader)
            t0 = time.perf_counter()
            first = next(it)  # worker start-up and the first window, reported apart
            startup = time.perf_counter() - t0
            pending = [first]

            def batches(pending=pending, it=it):
                return pending.pop() if pending else next(it)

            arm = run_arm(cfg, init, device, batches, args.warmup, args.steps)
            it.close()
            arm["startup_seconds"] = startup
            arm["overhead_vs_memory"] = arm["step_ms_mean"] / arms[0]["step_ms_mean"] - 1
            arms.append({"arm": f"loader, {workers} worker(s)", "workers": workers, **arm})
            print(
                f"{workers} workers: {arm['step_ms_mean']:.2f} ms/step, "
                f"wait {100 * arm['data_wait_share']:.1f}%",
                file=sys.stderr,
            )

        ddp = []
        accum = math.lcm(args.grad_accum, *args.processes) if args.processes else 1
        for processes in args.processes:  # one global batch for all: accum splits over each
            arm = ddp_arm(data, args, processes, accum, Path(tmp) / f"ddp{processes}")
            ddp.append(arm)
            print(
                f"{processes} process(es): {arm['step_ms_mean']:.2f} ms/step, "
                f"wait {100 * arm['data_wait_share']:.1f}%",
                file=sys.stderr,
            )

    result = {
        "benchmark": "distill_loader",
        "command": "python " + " ".join(sys.argv),
        "dataset": {
            "spec": args.data or f"synthetic: {args.shards} shards x {args.rows} rows",
            "shards": len(source.files),
            "S": source.num_steps,
            "L": source.seq_len,
        },
        "model": {
            "init": args.init,
            "identity": init.identity,
            "parameters": sum(p.numel() for p in init.model.parameters()),
        },
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "streams": args.streams,
        "shuffle_buffer": args.shuffle_buffer,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": args.precision,
        "device": _device_info(device),
        "target": "data wait < 5% of step time",
        "arms": arms,
        "processes": ddp,
        "verification": verification,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(out.with_suffix(".md").read_text())


def _markdown(r: dict) -> str:
    d, m = r["dataset"], r["model"]
    dev = r["device"]
    lines = [
        "# Distillation: time waiting for data",
        "",
        f"Dataset {d['spec']} ({d['shards']} shards, S={d['S']}, L={d['L']}); student from "
        f"`{m['identity'][:23]}…` ({m['parameters']:,} parameters); batch {r['batch_size']} "
        f"examples × {r['grad_accum']} accumulation, {r['streams']} streams, shuffle window "
        f"{r['shuffle_buffer']}; {r['steps']} timed steps after {r['warmup']} warm-up steps; "
        f"precision {r['precision']}.",
        "",
        "| arm | ms/step | examples/s | data wait ms/step | data wait share | overhead vs memory "
        "| start-up s |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in r["arms"]:
        overhead = a.get("overhead_vs_memory")
        startup = a.get("startup_seconds")
        lines.append(
            f"| {a['arm']} | {a['step_ms_mean']:.2f} | {a['examples_per_second']:,.0f} | "
            f"{a['data_wait_ms_mean']:.2f} | {100 * a['data_wait_share']:.1f}% | "
            f"{'-' if overhead is None else f'{100 * overhead:+.1f}%'} | "
            f"{'-' if startup is None else f'{startup:.2f}'} |"
        )
    if r.get("processes"):
        lines += [
            "",
            "The real trainer (`tsdfm-pipeline distill`) under `torchrun`, the same dataset and "
            "global batch, the accumulation split over the processes; data wait = the wait of "
            "the rank that waited most in each step, over the step's wall time (from the run's "
            "metrics.jsonl, after the warm-up steps):",
            "",
            "| job | grad accum | threads/process | ms/step | examples/s (job) | data wait share |",
            "|---|---|---|---|---|---|",
        ]
        for a in r["processes"]:
            lines.append(
                f"| {a['arm']} | {a['grad_accum']} | {a['threads_per_process']} | "
                f"{a['step_ms_mean']:.2f} | {a['examples_per_second']:,.0f} | "
                f"{100 * a['data_wait_share']:.1f}% |"
            )
    ver = r.get("verification")
    if ver is not None:
        v, u = ver["verified"], ver["unverified"]
        lines += [
            "",
            "Verification (on by default; `distill --no-verify` switches it off): sha256 of "
            f"every shard ({ver['shard_bytes'] / 2**20:.1f} MiB) against manifest.json when the "
            "dataset is opened, and the dataset contract on every row read.",
            "",
            "| | open the dataset s | read one epoch s ({} batches, 0 workers) |".format(
                v["batches"]
            ),
            "|---|---|---|",
            f"| verified | {v['open_seconds']:.3f} | {v['epoch_read_seconds']:.3f} |",
            f"| --no-verify | {u['open_seconds']:.3f} | {u['epoch_read_seconds']:.3f} |",
            "",
            f"Overhead of verification on opening plus one epoch of reading (least of 3 runs): "
            f"{100 * ver['overhead']:+.1f}%, {ver['ms_per_batch']:.2f} ms per batch of "
            f"{r['batch_size']} examples, paid in the loader workers beside the training step.",
        ]
    gpu = f", {dev['gpu']}" if "gpu" in dev else ""
    lines += [
        "",
        f"Target: {r['target']}.",
        "",
        f"Device: {dev['device']}{gpu} ({dev['cpu']}, {dev['threads']} threads), torch "
        f"{dev['torch']}, Python {dev['python']}"
        + (
            f"; load average {dev['load_average_1min']:.1f} when the run ended."
            if "load_average_1min" in dev
            else "."
        ),
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
