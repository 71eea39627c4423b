"""Storage benchmark: Parquet bytes per trajectory of schema v1 and v2 against the minimum.

    python benchmarks/storage_bench.py              # ~5 minutes on 2 cores
    python benchmarks/storage_bench.py --quick      # seconds (fewer rows, no real rows)

The information minimum of a trajectory (docs/results/build.md, with energies at 16 bits):
the final tokens at ⌈log2 V⌉ bits each, for the mask source the segment in which each
position was revealed at ⌈log2 (S+1)⌉ bits each, and 16 bits per stored candidate energy
(S·K of them in a shaped dataset, none in a blind K = 1 one). Target (issue 18): ≤ 1.5x, for
K = 1 and K = 8 at L = 64 and L = 1,024.

Rows measured:

- **synthetic** mask-source trajectories encoded straight through the shard writer
  (``write_shard``, the build's own Parquet options), 1,024 rows per shard so that footers do
  not dominate: final tokens uniform over V (the entropy the minimum assumes), reveal segments
  uniform over the S segments, energies from two models: N(-2, 1) (compass-like) and random
  finite float16 bit patterns (incompressible, the worst case for the 16-bit budget). Shapes:
  L = 64, V = 128 (the bundled teacher's) and L = 1,024, V = 50,257 (GPT-2's), S = 8.
- **real** rows of the bundled teacher (and compass for K = 8), built by the shard builder at
  L = 64 on the CPU; few rows (building is slow here), so only column bytes are compared.
- **row groups**: a v2 shard large enough to fill one row group, to measure the group's size
  (Arrow memory targeted by the writer, and the uncompressed size Parquet records, which
  ``verify`` bounds by 100 MiB).

Results: docs/results/storage.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from results_io import column_bytes, cpu_device, package_versions, write_results

from tsdfm.models.data.schema import TrajectoryBatch, batch_rows, encode_rows, transcode
from tsdfm.pipeline.shards import write_shard

S = 8
SHAPES = ((64, 128), (1024, 50257))  # (L, V)
SEED = 5


def information_minimum(L: int, V: int, S: int, K: int) -> float:
    """Bytes: L ⌈log2 V⌉ + L ⌈log2 (S+1)⌉ bits, plus 16 bits per energy when K > 1."""
    bits = L * math.ceil(math.log2(V)) + L * math.ceil(math.log2(S + 1))
    return (bits + (S * K * 16 if K > 1 else 0)) / 8


def _energies(rng: np.random.Generator, shape: tuple[int, ...], model: str) -> np.ndarray:
    if model == "normal":
        return rng.normal(-2.0, 1.0, size=shape).astype(np.float32)
    bits = rng.integers(0, 2**16, size=shape, dtype=np.uint16)
    finite = (bits & 0x7C00) != 0x7C00  # exponent all ones: inf or NaN
    bits = np.where(finite, bits, bits & 0xBFFF)  # clear the top exponent bit there
    return bits.view(np.float16).astype(np.float32)


def synthetic_batch(
    first: int, n: int, L: int, V: int, K: int, energy_model: str, seed: int = SEED
) -> TrajectoryBatch:
    """n mask-source trajectories of the shape (S, L, V, K): see the module docstring."""
    rng = np.random.default_rng([seed, first, L, K])
    tokens = rng.integers(0, V, size=(n, L))
    reveal = rng.integers(0, S, size=(n, L))
    m = np.arange(S + 1)[None, :, None]
    states = np.where(m > reveal[:, None, :], tokens[:, None, :], V)  # [MASK] = V
    shaped = np.full(S, K > 1)
    energies = _energies(rng, (n, S, K), energy_model)
    chosen = np.where(shaped, energies.argmin(2), 0)
    ids = np.arange(first, first + n)
    return TrajectoryBatch(
        trajectory_id=ids,
        shard=0,
        seed=ids + SEED * 2**32,
        times=np.linspace(0, 1, S + 1),
        states=states,
        energies=energies,
        shaped=shaped,
        chosen=chosen,
    )


def _metadata(version: int, K: int, text: bool = False, seed: int = SEED) -> dict:
    config = {"seed": seed, "navigator": {"student_steps": S, "candidates": K}}
    if version == 2:
        config["schema_version"] = 2
        if text:
            config["text"] = True
    return {"schema_version": version, "config": config}


def _measure(
    root: Path, batches, version: int, K: int, text: bool = False, seed: int = SEED
) -> dict:
    """Write one shard of ``batches`` and measure it: bytes per row, per column, footer."""
    t0 = time.perf_counter()
    info = write_shard(str(root), 0, 1, batches, _metadata(version, K, text, seed))
    seconds = time.perf_counter() - t0
    path = root / info.path
    columns = column_bytes([path])
    md = pq.ParquetFile(path).metadata
    groups = [md.row_group(g).total_byte_size for g in range(md.num_row_groups)]
    n = info.rows
    return {
        "version": version,
        "rows": n,
        "bytes": info.bytes,
        "bytes_per_trajectory": info.bytes / n,
        "column_bytes_per_trajectory": {k: v / n for k, v in columns.items()},
        "footer_bytes_per_trajectory": (info.bytes - sum(columns.values())) / n,
        "row_groups": md.num_row_groups,
        "max_row_group_uncompressed_bytes": max(groups),
        "write_seconds": seconds,
    }


def synthetic_runs(rows: int, tmp: Path) -> list[dict]:
    runs = []
    for L, V in SHAPES:
        for K in (1, 8):
            for model in ("normal", "incompressible") if K > 1 else ("normal",):
                batch = synthetic_batch(0, rows, L, V, K, model)
                minimum = information_minimum(L, V, S, K)
                for version in (1, 2):
                    where = tmp / f"syn-{L}-{K}-{model}-v{version}"
                    r = _measure(where, [batch], version, K)
                    r.update(L=L, V=V, K=K, S=S, energies=model, minimum_bytes=minimum)
                    r["over_minimum"] = r["bytes_per_trajectory"] / minimum
                    runs.append(r)
                    print(
                        f"synthetic L={L} K={K} {model} v{version}: "
                        f"{r['bytes_per_trajectory']:.1f} B/traj = {r['over_minimum']:.2f}x "
                        f"the {minimum:.0f} B minimum",
                        flush=True,
                    )
    return runs


def real_runs(rows: int, tmp: Path) -> list[dict]:
    """Rows of the bundled teacher (K = 1) and teacher + compass (K = 8), v1 and v2."""
    import torch

    from tsdfm.models.checkpoint import bundled_path
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.pipeline.config import BuildConfig
    from tsdfm.pipeline.worker import ShardBuilder

    torch.set_num_threads(1)
    runs = []
    for K in (1, 8):
        nav = NavigatorConfig(student_steps=S, teacher_steps=128, candidates=K)
        cfg = BuildConfig(
            teacher=str(bundled_path("teacher")),
            compass=str(bundled_path("compass")) if K > 1 else None,
            shards=1,
            trajectories_per_shard=rows,
            batch_size=rows,
            navigator=nav,
            seed=0,
            schema_version=1,
        )
        builder = ShardBuilder(cfg, str(tmp / f"real-{K}-v1"), "cpu")
        t0 = time.perf_counter()
        result = builder.build(0)
        build_seconds = time.perf_counter() - t0
        table = pq.read_table(tmp / f"real-{K}-v1" / result.info.path)
        V, L = builder.teacher.config.vocab_size, builder.teacher.config.seq_len
        minimum = information_minimum(L, V, S, K)
        for version, text in ((1, True), (2, False)):
            rows_table = transcode(table, version, text)
            r = _measure(tmp / f"real-{K}-v{version}w", [rows_table], version, K, text, 0)
            r["columns_per_trajectory"] = sum(r["column_bytes_per_trajectory"].values())
            r.update(L=L, V=V, K=K, S=S, minimum_bytes=minimum, build_seconds=build_seconds)
            r["columns_over_minimum"] = r["columns_per_trajectory"] / minimum
            r["text"] = text
            runs.append(r)
            print(
                f"real L={L} K={K} v{version}: columns {r['columns_per_trajectory']:.1f} B/traj "
                f"= {r['columns_over_minimum']:.2f}x the {minimum:.0f} B minimum "
                f"({rows} rows, built in {build_seconds:.0f} s)",
                flush=True,
            )
    return runs


def row_group_run(tmp: Path, quick: bool) -> dict:
    """A v2 shard of L = 1,024, K = 8 rows large enough to fill one ~100 MB row group."""
    L, V, K = 1024, 50257, 8
    one = synthetic_batch(0, 1, L, V, K, "normal")
    per_row = encode_rows(batch_rows(one), 2, False).slice(0, 1).nbytes
    n = 2048 if quick else int(1.3 * 100e6 / per_row)
    batches = (
        synthetic_batch(lo, min(1024, n - lo), L, V, K, "normal") for lo in range(0, n, 1024)
    )
    r = _measure(tmp / "row-group", batches, 2, K)
    path = next((tmp / "row-group" / "data").glob("*.parquet"))
    first = pq.ParquetFile(path).read_row_group(0)
    r.update(
        L=L,
        K=K,
        arrow_bytes_per_row=per_row,
        first_group_rows=first.num_rows,
        first_group_arrow_bytes=first.nbytes,
    )
    print(
        f"row groups: {r['row_groups']} for {n} rows; the first holds {first.num_rows} rows, "
        f"{first.nbytes / 1e6:.1f} MB in Arrow memory, "
        f"{r['max_row_group_uncompressed_bytes'] / 1e6:.1f} MB uncompressed Parquet",
        flush=True,
    )
    return r


def _table(runs: list[dict], key: str, over: str) -> list[str]:
    lines = [
        "| L | V | K | energies | schema | rows | bytes/traj | minimum | ratio | footer/traj |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['L']:,} | {r['V']:,} | {r['K']} | {r.get('energies', 'real')} | "
            f"v{r['version']} | {r['rows']:,} | {r[key]:,.1f} | {r['minimum_bytes']:,.0f} | "
            f"{r[over]:.2f}x | {r['footer_bytes_per_trajectory']:.1f} |"
        )
    return lines


def _columns(runs: list[dict]) -> list[str]:
    lines = [
        "| L | K | energies | schema | bytes per trajectory by column |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        cols = ", ".join(
            f"{k} {v:,.1f}" for k, v in r["column_bytes_per_trajectory"].items() if v >= 0.5
        )
        lines.append(
            f"| {r['L']:,} | {r['K']} | {r.get('energies', 'real')} | v{r['version']} | {cols} |"
        )
    return lines


def markdown(result: dict) -> str:
    syn, real, group = result["synthetic"], result["real"], result["row_group"]
    dev = result["device"]
    v2 = [r for r in syn if r["version"] == 2]
    worst = max(v2, key=lambda r: r["over_minimum"])
    small = next(r for r in v2 if r["L"] == 1024 and r["K"] == 8)
    out = [
        "# Storage: bytes per trajectory against the information minimum",
        "",
        f"Device: {dev['cpu']} (CPU; Parquet writing needs no GPU), Python {dev['python']}, "
        f"pyarrow {result['packages']['pyarrow']}. Minimum: L ⌈log2 V⌉ + L ⌈log2 (S+1)⌉ bits "
        "+ 16 bits per stored energy (docs/results/build.md, energies at 16 bits); S = 8.",
        "",
        f"**Schema v2: at most {worst['over_minimum']:.2f}x the minimum** (target ≤ 1.5x) over "
        "K = 1 and K = 8 at L = 64 and L = 1,024; schema v1 of the same rows: "
        + ", ".join(
            f"{r['over_minimum']:.2f}x"
            for r in syn
            if r["version"] == 1 and r["energies"] == "normal"
        )
        + " (L = 64 K = 1, K = 8; L = 1,024 K = 1, K = 8).",
        "",
        "## Synthetic trajectories through the shard writer",
        "",
        "Mask-source rows encoded straight through `write_shard` (the build's Parquet options), "
        f"{syn[0]['rows']:,} rows per shard: tokens uniform over V, reveal segments uniform over "
        "S, energies N(-2, 1) or random finite float16 bit patterns (incompressible). "
        "bytes/traj is the whole file (footer, page index and `tsdfm` metadata included) over "
        "its rows.",
        "",
        *_table(syn, "bytes_per_trajectory", "over_minimum"),
        "",
        *_columns(syn),
        "",
    ]
    if real:
        out += [
            "## Real rows of the bundled teacher (L = 64)",
            "",
            f"{real[0]['rows']} rows per shard, built on this CPU by the shard builder "
            "(S = 8, N = 128; K = 8 with the bundled compass); v1 with its text column, v2 "
            "without (v2's default). With so few rows the footer dominates the file, so "
            "bytes/traj and the ratio here count the column chunks alone (each chunk still "
            "carries its own dictionary page and headers, ~2 B per column and row at 32 rows).",
            "",
            *_table(
                [{**r, "bytes_per_trajectory": r["columns_per_trajectory"]} for r in real],
                "bytes_per_trajectory",
                "columns_over_minimum",
            ),
            "",
            *_columns(real),
            "",
        ]
    out += [
        "## Row groups",
        "",
        f"A v2 shard of {group['rows']:,} rows at L = 1,024, K = 8 "
        f"({group['arrow_bytes_per_row']:,} B of Arrow memory per row): "
        f"{group['row_groups']} row groups; the first holds "
        f"{group['first_group_rows']:,} rows, {group['first_group_arrow_bytes'] / 1e6:.1f} MB in "
        f"Arrow memory and {group['max_row_group_uncompressed_bytes'] / 1e6:.1f} MB uncompressed "
        "in Parquet (what `verify` bounds by 100 MiB). A shard smaller than one group is one "
        f"group: {small['rows']:,} rows of L = 1,024 are "
        f"{small['max_row_group_uncompressed_bytes'] / 1e6:.1f} MB uncompressed.",
        "",
        "## Reading the numbers",
        "",
        "- v2 meets the target everywhere measured: the tokens cost their ⌈log2 V⌉ bits "
        "(dictionary + bit-packed indices; at L = 1,024, V = 50,257 the 2,179 B include the "
        "dictionary page of a 1,024-row shard), the reveal segments less than their "
        "⌈log2 (S+1)⌉ bits (8 distinct values), and the float16 energies their 16 bits or less.",
        "- What dominated before the writer fix: v2's float16 energies were dictionary-encoded "
        "like every other column. Their values are nearly all distinct, so a dictionary page "
        "plus ~15-bit indices cost more than the values: incompressible energies took 207 B "
        "per trajectory at L = 64, K = 8 (1,024 rows; 1.39x the minimum for the whole file) "
        "against 128 B stored plain. The writer now stores v2 energies plain + zstd "
        "(`pipeline/shards.py`, `PLAIN_COLUMNS_V2`); v1 files keep the dictionary, so their "
        "bytes do not change. BYTE_STREAM_SPLIT was not needed (plain already reaches 16 bits).",
        "- The synthetic tokens are uniform, the entropy the minimum assumes. The real rows' "
        "tokens cost 60–64 B per trajectory at 32 rows, of which the 128-entry dictionary page "
        "is 16 B; at 1,024 rows that page is 0.5 B per trajectory.",
        "- The footer, page index and `tsdfm` metadata are ~4 KB per file: 4–5 B per trajectory "
        "at 1,024 rows, 125 B at 32 rows.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 rows per shard, no real rows")
    ap.add_argument("--rows", type=int, default=None, help="synthetic rows per shard (1024)")
    ap.add_argument("--real-rows", type=int, default=None, help="real rows per build (32)")
    ap.add_argument("--out", default="docs/results/storage")
    args = ap.parse_args()
    rows = args.rows or (256 if args.quick else 1024)
    real_rows = args.real_rows if args.real_rows is not None else (0 if args.quick else 32)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        syn = synthetic_runs(rows, tmp)
        group = row_group_run(tmp, args.quick)
        real = real_runs(real_rows, tmp) if real_rows else []
    command = "python benchmarks/storage_bench.py" + (" --quick" if args.quick else "")
    result = {
        "command": command,
        "device": cpu_device(),
        "packages": package_versions(("pyarrow", "numpy", "torch")),
        "S": S,
        "synthetic": syn,
        "row_group": group,
        "real": real,
        "figures": {
            "v2_max_over_minimum": max(r["over_minimum"] for r in syn if r["version"] == 2),
            "v1_max_over_minimum": max(r["over_minimum"] for r in syn if r["version"] == 1),
        },
    }
    print(write_results(args.out, result, markdown(result)).read_text())


def rewrite_markdown(out: str = "docs/results/storage") -> None:
    """Render OUT.md again from OUT.json (the Markdown is a function of the results)."""
    import json

    result = json.loads(Path(out + ".json").read_text())
    Path(out + ".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
