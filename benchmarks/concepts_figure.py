"""Concepts figure: one real shaped trajectory, segment by segment.

    python benchmarks/concepts_figure.py          # bundled teacher + compass, CPU, ~1 minute

Builds one small shard (4 trajectories; S = 8, N = 1,024, K = 8, τ = 0) with the project's own
build (``tsdfm.pipeline.build.run_build``, one Ray actor on the CPU) into a temporary folder, reads
one row back with pyarrow (columns of docs/schema.md) and draws:

(a) the kept state x_{t_k} at each student time t_0 … t_S: positions × times, each cell masked,
    revealed earlier, or revealed in the segment that ends at t_k (labelled with its token),
    with the number of tokens revealed per segment beside it;
(b) for each segment k, the compass energies e_j (j = 0 … K−1) of the K candidate rollouts
    scored at t_{k+1}, with the kept one (``chosen[k]``, the argmin) marked.

A shard is a pure function of its config and index, so rerunning this on the same hardware and
software draws the same trajectory.

Results: docs/results/concepts-trajectory.{png,json} (the JSON holds every plotted number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from results_io import cpu_model
from tokenizers import Tokenizer

from tsdfm.models.checkpoint import bundled_path
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.pipeline.build import run_build
from tsdfm.pipeline.config import BuildConfig

MASKED, EARLIER, NEW = 0, 1, 2
COLOURS = ("#e4e4e4", "#9ecae1", "#e6550d")


def build_one_row(teacher: str, compass: str, row: int, trajectories: int) -> dict:
    """Build one shard of ``trajectories`` rows in a temp folder; return row ``row`` and its
    shard's ``tsdfm`` metadata."""
    nav = NavigatorConfig(student_steps=8, teacher_steps=1024, candidates=8, tau=0.0)
    cfg = BuildConfig(
        teacher=teacher,
        compass=compass,
        shards=1,
        trajectories_per_shard=trajectories,
        batch_size=trajectories,
        navigator=nav,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "concepts"
        summary = run_build(cfg, str(root), device="cpu", num_workers=1)
        (shard,) = sorted((root / "data").glob("*.parquet"))
        table = pq.read_table(shard)
        meta = json.loads(pq.ParquetFile(shard).metadata.metadata[b"tsdfm"])  # file-level
    record = table.slice(row, 1).to_pylist()[0]
    from tsdfm.models.data.schema import decode_rows

    record["states"] = decode_rows(table.slice(row, 1)).states[0].tolist()  # v1 or v2
    return {"row": record, "meta": meta, "fingerprint": summary.fingerprint}


def reveal_grid(states: np.ndarray, mask_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell kinds and tokens revealed per segment.

    Args:
        states: (S+1, L) kept states x_{t_0} … x_{t_S}.
    Returns:
        kind: (S+1, L) with MASKED / EARLIER / NEW (NEW: masked at t_{k-1}, revealed at t_k).
        revealed: (S,) positions revealed in segment k, i.e. between t_k and t_{k+1}.
    """
    masked = states == mask_id
    kind = np.where(masked, MASKED, EARLIER)
    new = np.zeros_like(masked)
    new[1:] = masked[:-1] & ~masked[1:]
    kind[new] = NEW
    return kind, new[1:].sum(axis=1)


def draw(path: Path, r: dict, kind: np.ndarray, revealed: np.ndarray, vocab: Tokenizer) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    states = np.asarray(r["states"])
    times = r["times"]
    energies = np.asarray(r["energies"], dtype=float)  # (S, K)
    chosen = r["chosen"]
    S1, L = states.shape
    S, K = energies.shape

    fig = plt.figure(figsize=(15, 8.6))
    gs = fig.add_gridspec(
        2, 2, width_ratios=(13, 1.3), height_ratios=(1.15, 1), hspace=0.38, wspace=0.03
    )
    ax = fig.add_subplot(gs[0, 0])
    bar = fig.add_subplot(gs[0, 1], sharey=ax)
    en = fig.add_subplot(gs[1, :])

    # (a) the kept state at each t_k
    ax.imshow(kind, cmap=ListedColormap(COLOURS), vmin=0, vmax=2, aspect="auto")
    for k in range(S1):
        for i in range(L):
            if kind[k, i] == MASKED:
                continue
            new = kind[k, i] == NEW
            ax.text(
                i,
                k,
                vocab.id_to_token(int(states[k, i])),
                ha="center",
                va="center",
                rotation=90,
                fontsize=5.5,
                color="white" if new else "#3a3a3a",
                fontweight="bold" if new else "normal",
            )
    ax.set_yticks(range(S1), [f"$t_{k}$ = {t:.3f}" for k, t in enumerate(times)])
    ax.set_xticks(range(0, L, 8))
    ax.set_xticks(np.arange(-0.5, L, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, S1, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("position i")
    ax.set_title(
        f"(a) trajectory {r['trajectory_id']}: the kept state x at each student time "
        f"(S = {S}, {r['N'] // S} teacher sub-steps per segment)",
        loc="left",
        fontsize=11,
    )
    ax.legend(
        handles=[
            Patch(color=COLOURS[MASKED], label="[MASK]"),
            Patch(color=COLOURS[EARLIER], label="revealed earlier"),
            Patch(color=COLOURS[NEW], label="revealed in the segment ending here"),
        ],
        loc="upper left",
        bbox_to_anchor=(0.0, -0.13),
        ncol=3,
        frameon=False,
        fontsize=9,
    )

    bar.barh(range(1, S1), revealed, color=COLOURS[NEW], height=0.6)
    for k, n in enumerate(revealed, start=1):
        bar.text(n + 0.5, k, str(n), va="center", fontsize=8)
    bar.set_xlim(0, max(revealed) * 1.35 + 1)
    bar.tick_params(labelleft=False)
    bar.set_title("tokens revealed\nin the segment", fontsize=9)

    # (b) candidate energies per segment
    rng = np.random.default_rng(0)  # horizontal jitter of the points only
    for k in range(S):
        xs = k + rng.uniform(-0.18, 0.18, K)
        others = np.arange(K) != chosen[k]
        en.scatter(xs[others], energies[k, others], s=22, color="#6b6b6b", zorder=2)
        en.scatter(
            xs[chosen[k]],
            energies[k, chosen[k]],
            s=120,
            marker="*",
            color=COLOURS[NEW],
            edgecolor="black",
            linewidth=0.5,
            zorder=3,
        )
        en.hlines(energies[k].mean(), k - 0.3, k + 0.3, color="#1f77b4", linewidth=1.2)
    en.set_xticks(
        range(S),
        [
            f"segment {k}\nt = {times[k]:.3f} → {times[k + 1]:.3f}\nkept j = {chosen[k]}"
            for k in range(S)
        ],
        fontsize=8,
    )
    en.set_xlim(-0.6, S - 0.4)
    en.set_ylabel("compass energy (lower = more coherent)")
    en.set_title(
        f"(b) energies of the K = {K} candidate rollouts at the end of each segment",
        loc="left",
        fontsize=11,
    )
    en.legend(
        handles=[
            plt.Line2D([], [], marker="o", ls="", color="#6b6b6b", label="candidate"),
            plt.Line2D(
                [],
                [],
                marker="*",
                ls="",
                markersize=11,
                color=COLOURS[NEW],
                markeredgecolor="black",
                label="kept candidate (argmin)",
            ),
            plt.Line2D([], [], color="#1f77b4", label="mean of the K candidates"),
        ],
        loc="best",
        fontsize=9,
    )
    en.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher", default=str(bundled_path("teacher")))
    ap.add_argument("--compass", default=str(bundled_path("compass")))
    ap.add_argument("--trajectories", type=int, default=4, help="rows in the one shard built")
    ap.add_argument("--row", type=int, default=0, help="which row to draw")
    ap.add_argument("--out", default="docs/results/concepts-trajectory", help="path prefix")
    args = ap.parse_args()
    if not 0 <= args.row < args.trajectories:
        sys.exit(f"--row {args.row} must lie in [0, --trajectories={args.trajectories})")

    built = build_one_row(args.teacher, args.compass, args.row, args.trajectories)
    row, meta = built["row"], built["meta"]
    nav = meta["config"]["navigator"]
    vocab = Tokenizer.from_file(str(Path(args.teacher) / "tokenizer.json"))
    mask_id = vocab.token_to_id("[MASK]")
    states = np.asarray(row["states"])
    kind, revealed = reveal_grid(states, mask_id)
    energies = np.asarray(row["energies"], dtype=float)
    chosen = list(row["chosen"])
    mean = energies.mean(axis=1)
    kept = energies[np.arange(len(chosen)), chosen]

    png, js = Path(args.out + ".png"), Path(args.out + ".json")
    png.parent.mkdir(parents=True, exist_ok=True)
    draw(png, {**row, "N": nav["teacher_steps"]}, kind, revealed, vocab)
    result = {
        "figure": "concepts-trajectory",
        "command": "python " + " ".join(sys.argv),
        "png": png.name,
        "trajectory_id": row["trajectory_id"],
        "seed": row["seed"],
        "navigator": nav,
        "shard": {"rows": args.trajectories, "row": args.row},
        "times": row["times"],
        "states": states.tolist(),
        "mask_id": mask_id,
        "revealed_per_segment": revealed.tolist(),
        "energies": energies.tolist(),
        "chosen": chosen,
        "chosen_energy": kept.tolist(),
        "mean_candidate_energy": mean.tolist(),
        "energy_gain": (mean - kept).tolist(),
        "energy_gain_mean": float((mean - kept).mean()),
        "text": row["text"],
        "teacher_identity": meta["teacher_identity"],
        "compass_identity": meta["compass_identity"],
        "fingerprint": built["fingerprint"],
        "device": {
            "device": "cpu",
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "workers": 1,
        },
        "versions": {
            "tsdfm-pipeline": meta["package_version"],
            "schema": meta["schema_version"],
            "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "pyarrow", "ray", "matplotlib")},
        },
    }
    js.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {png} and {js}")
    print(f"revealed per segment: {result['revealed_per_segment']}")
    print(f"chosen: {chosen}; mean energy gain {result['energy_gain_mean']:.3f}")


if __name__ == "__main__":
    main()
