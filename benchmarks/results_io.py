"""Where a benchmark's results go: ``OUT.json`` and ``OUT.md`` beside each other, and the
machine and package facts every results file records.

OUT is a path prefix, not a file name with a suffix: ``docs/results/eval_T1.5`` writes
``eval_T1.5.json`` (``Path.with_suffix`` would have replaced the ``.5``). Samples small
enough to commit beside them go through :func:`write_jsonl_gz`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def result_paths(out: str | Path) -> tuple[Path, Path]:
    """(OUT.json, OUT.md) for the prefix ``out``."""
    out = str(out)
    return Path(out + ".json"), Path(out + ".md")


def write_results(out: str | Path, result: dict, markdown: str) -> Path:
    """Write the JSON and Markdown results; returns the Markdown path."""
    json_path, md_path = result_paths(out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown)
    return md_path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device() -> dict:
    """The CPU device a benchmark ran on: model name, torch threads, Python version."""
    import torch

    return {
        "device": "cpu",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_jsonl_gz(path: str | Path, records: list[dict], max_bytes: int) -> dict:
    """Write ``records`` as gzip'd JSON lines at ``path``, keeping the first n that fit.

    The bytes depend only on the records (no file name or time in the gzip header), so a rerun
    rewrites the same file. n is the largest count whose compressed file is at most
    ``max_bytes``; the file is written to ``PATH.tmp`` and renamed into place.

    Returns:
        {"file": name, "records": n, "of": len(records), "bytes", "sha256"}.
    """
    path = Path(path)
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records]

    def blob(n: int) -> bytes:
        return gzip.compress("".join(lines[:n]).encode(), compresslevel=9, mtime=0)

    n, data = len(lines), blob(len(lines))
    if len(data) > max_bytes:  # the largest n that fits, by bisection on the compressed size
        lo, hi = 0, len(lines)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(blob(mid)) <= max_bytes:
                lo = mid
            else:
                hi = mid - 1
        n, data = lo, blob(lo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    return {
        "file": path.name,
        "records": n,
        "of": len(records),
        "bytes": len(data),
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
    }


def column_bytes(files) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over the row groups of Parquet ``files``."""
    import pyarrow.parquet as pq

    sizes: dict[str, int] = {}
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".", 1)[0]
                sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes
