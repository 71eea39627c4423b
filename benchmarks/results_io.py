"""Where a benchmark's results go: ``OUT.json`` and ``OUT.md`` beside each other, and the
machine and package facts every results file records.

OUT is a path prefix, not a file name with a suffix: ``docs/results/eval_T1.5`` writes
``eval_T1.5.json`` (``Path.with_suffix`` would have replaced the ``.5``).
"""

from __future__ import annotations

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


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
