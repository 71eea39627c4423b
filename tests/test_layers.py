"""The architecture holds: one namespace, layers that point one way, no import cycles, and a
trainer side (distill, sample, eval, inspect, verify) that runs without Ray or transformers.

The import graph is read from the source with ``ast``, lazy (function-level) imports included:
a cycle held up by a lazy import is still a cycle. Imports under ``if TYPE_CHECKING:`` are
annotations only and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"models": "tsdfm.models", "pipeline": "tsdfm.pipeline"}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their ``__init__``)."""
    out = {}
    for folder, prefix in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # annotations only: not an import at run time
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.add(t)
    return found


GRAPH = {n: _imports(n, p, _modules()) for n, p in _modules().items()}


def test_no_module_claims_a_generic_import_name():
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "").split(".")[0] not in FOLDERS, (path, node.module)
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name.split(".")[0] not in FOLDERS, (path, a.name)


def test_models_never_import_the_build_system():
    bad = sorted(
        (m, t)
        for m, ts in GRAPH.items()
        if m.startswith("tsdfm.models")
        for t in ts
        if t.startswith("tsdfm.pipeline")
    )
    assert not bad, f"tsdfm.models imports tsdfm.pipeline: {bad}"


def test_eval_sits_below_train():
    bad = sorted(
        (m, t)
        for m, ts in GRAPH.items()
        if m.startswith("tsdfm.models.eval")
        for t in ts
        if t.startswith("tsdfm.models.train")
    )
    assert not bad, f"tsdfm.models.eval imports tsdfm.models.train: {bad}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_every_subpackage_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {n for n, p in _modules().items() if p.name == "__init__.py"}
    assert listed == on_disk
    assert cfg["package-dir"] == {v: k for k, v in FOLDERS.items()}


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_research_repo_with_its_own_models_folder_still_imports_the_trainer(tmp_path):
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("MINE = True\n")
    done = _run(
        textwrap.dedent(
            """
        import models, pipeline
        assert models.MINE and pipeline.MINE
        import tsdfm.models.train.distill, tsdfm.pipeline.cli
        print(tsdfm.models.train.distill.__name__)
        """
        ),
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tsdfm.models.train.distill"


# Makes `import ray` / `import transformers` fail as on a core-only install.
BLOCK = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "transformers"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Missing())
"""


@pytest.mark.slow
def test_the_trainer_side_runs_without_ray_or_transformers(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher
):
    teacher = saved_tiny_teacher
    out = tmp_path / "student"
    done = _run(
        BLOCK
        + textwrap.dedent(
            f"""
        from typer.testing import CliRunner
        from tsdfm.pipeline.cli import app
        r = CliRunner()
        def ok(*args):
            res = r.invoke(app, list(args))
            assert res.exit_code == 0, (args, res.output, res.exception)
            return res.output
        data = {str(tiny_blind_dataset)!r}
        ok("verify", data)
        ok("inspect", data)
        ok("distill", "--data", data, "--init", {str(teacher)!r}, "--out", {str(out)!r},
           "--steps", "2", "--batch-size", "4", "--eval-samples", "4", "--device", "cpu")
        ok("sample", "--model", {str(out / "final")!r}, "-n", "2", "--device", "cpu")
        ok("eval", "--model", {str(out / "final")!r}, "--samples", "4",
           "--batch-size", "4", "--device", "cpu")
        assert not any(m.split(".")[0] in {{"ray", "transformers"}} for m in sys.modules)
        """
        ),
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_missing_extra_is_one_line_naming_the_install(tmp_path):
    done = _run(
        BLOCK
        + textwrap.dedent(
            """
        from typer.testing import CliRunner
        from tsdfm.pipeline.cli import app
        res = CliRunner().invoke(app, ["build", "--out", "ds", "--shards", "1"])
        assert res.exit_code == 2, res.output
        print(res.output)
        """
        ),
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "tsdfm-pipeline[build]" in lines[0]
    assert not (tmp_path / "ds").exists()


def test_a_missing_text_extra_is_one_line_naming_the_install(tmp_path):
    done = _run(
        BLOCK
        + textwrap.dedent(
            """
        from typer.testing import CliRunner
        from tsdfm.pipeline.cli import app
        args = ["lm", "train", "--corpus", "c", "--tokenizer", "t", "--out", "lm"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        print(res.output)
        """
        ),
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "tsdfm-pipeline[text]" in lines[0]
    assert not (tmp_path / "lm").exists()
