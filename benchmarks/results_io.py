"""Where a benchmark's results go: ``OUT.json`` and ``OUT.md`` beside each other.

OUT is a path prefix, not a file name with a suffix: ``docs/results/eval_T1.5`` writes
``eval_T1.5.json`` (``Path.with_suffix`` would have replaced the ``.5``).
"""

from __future__ import annotations

import json
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
