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

Without ``--data`` the script writes a dataset of random mask-path trajectories with the
bundled teacher's shape (V=128, L=64, S=8) through ``pipeline.shards.write_shard``: the real
file layout, compression and metadata (the loader's cost does not depend on what the tokens
say), and no Ray or teacher rollouts. Results go to docs/results/distill_loader.{json,md}
with the device they ran on. Numbers are measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import bundled_path, load_checkpoint
from models.data.trajectories import LoaderConfig, TrajectoryLoader, open_trajectory_dataset
from models.train.distill import DistillConfig, StudentStep, build_student


def synthetic_dataset(root: Path, shards: int, rows: int, ckpt, steps: int, seed: int) -> Path:
    """Random mask-path trajectories of ``ckpt``'s shape, written as a real tsdfm dataset."""
    from pipeline.schema import TrajectoryBatch
    from pipeline.shards import write_shard

    mc = ckpt.config
    V, L, M = mc.vocab_size, mc.seq_len, mc.mask_token_id
    rng = np.random.default_rng(seed)
    times = np.arange(steps + 1, dtype=np.float64) / steps
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
        meta = {"teacher_identity": ckpt.identity, "fingerprint": "sha256:" + "0" * 64}
        write_shard(str(root), i, shards, [batch], meta)
    return root


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
    gpu = f", {dev['gpu']}" if "gpu" in dev else ""
    lines += [
        "",
        f"Target: {r['target']}.",
        "",
        f"Device: {dev['device']}{gpu} ({dev['cpu']}, {dev['threads']} threads), torch "
        f"{dev['torch']}, Python {dev['python']}.",
        "",
        f"Command: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
