"""`convert`: a v1 dataset rewritten as v2 decodes to the same trajectories as v1 and as a
native v2 build of the same config, has that build's bytes, verifies, and resumes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tsdfm.models.data.schema import decode_rows
from tsdfm.models.errors import ConfigError, DataError
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.pipeline.build import run_build
from tsdfm.pipeline.cli import app
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.convert import convert
from tsdfm.pipeline.manifest import Manifest, without_timings
from tsdfm.pipeline.verify import verify_folder

pytestmark = pytest.mark.usefixtures("ray_cluster")
FIELDS = ("ids", "seed", "shard", "times", "states", "shaped", "chosen")


def _cfg(teacher, compass=None, candidates=1, **kw) -> BuildConfig:
    nav = NavigatorConfig(student_steps=4, teacher_steps=16, candidates=candidates)
    base = dict(
        teacher=str(teacher),
        compass=None if compass is None else str(compass),
        shards=2,
        trajectories_per_shard=6,
        batch_size=4,
        navigator=nav,
        seed=5,
    )
    return BuildConfig(**{**base, **kw})


def _build(cfg: BuildConfig, root: Path) -> Path:
    run_build(cfg, str(root), device="cpu", num_workers=1)
    return root


def _rows(root: Path):
    """Every shard of ``root`` through the one decoder, concatenated."""
    files = sorted((root / "data").glob("train-*.parquet"))
    return [decode_rows(pq.read_table(f)) for f in files]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _shard_hashes(root: Path) -> list[str]:
    m = Manifest.load(str(root))
    return [m.shard(i)["sha256"] for i in range(m.num_shards)]


def _assert_same_trajectories(a, b) -> None:
    for ra, rb in zip(a, b, strict=True):
        for f in FIELDS:
            x, y = getattr(ra, f), getattr(rb, f)
            assert x.dtype == y.dtype and np.array_equal(x, y), f
        # v2 stores float16: the same values as v1's float32 rounded once
        e16 = ra.energies.astype(np.float16).astype(np.float32)
        assert np.array_equal(
            e16, rb.energies.astype(np.float16).astype(np.float32), equal_nan=True
        )
        assert ra.text == rb.text


@pytest.fixture(scope="module")
def mask_builds(tmp_path_factory, saved_tiny_teacher, saved_tiny_compass):
    """The same shaped (K = 3) mask-source build at v1, at v2 with text, and v1 converted."""
    root = tmp_path_factory.mktemp("convert-mask")
    cfg = _cfg(saved_tiny_teacher, saved_tiny_compass, candidates=3, schema_version=1)
    v1 = _build(cfg, root / "v1")
    before = _hashes(v1)
    v2 = _build(_cfg(saved_tiny_teacher, saved_tiny_compass, 3, text=True), root / "v2")
    converted = root / "converted"
    summary = convert(str(v1), str(converted))
    return {"v1": v1, "v2": v2, "converted": converted, "summary": summary, "before": before}


def test_converted_mask_dataset_equals_v1_and_the_native_v2_build(mask_builds):
    v1, v2, converted = mask_builds["v1"], mask_builds["v2"], mask_builds["converted"]
    rows_v1, rows_v2, rows_c = _rows(v1), _rows(v2), _rows(converted)
    assert rows_v1[0].shaped.any() and not np.isnan(rows_v1[0].energies[rows_v1[0].shaped]).any()
    _assert_same_trajectories(rows_v1, rows_v2)
    _assert_same_trajectories(rows_v1, rows_c)
    for a, b in zip(rows_v2, rows_c, strict=True):  # v2 and converted: every field exact
        assert np.array_equal(a.energies, b.energies, equal_nan=True)
    # v2 stores the final tokens and reveal segments, not the states
    names = pq.read_schema(next((converted / "data").glob("*.parquet"))).names
    assert "states" not in names and {"tokens", "reveal", "text"} <= set(names)
    # the bytes, the fingerprint and the record of a native v2 build (counters aside)
    assert _shard_hashes(converted) == _shard_hashes(v2)
    a = without_timings(json.loads((converted / "manifest.json").read_text()))
    b = without_timings(json.loads((v2 / "manifest.json").read_text()))
    assert a == b
    assert mask_builds["summary"].fingerprint == Manifest.load(str(v2)).fingerprint
    # the source is untouched, the result verifies (card included)
    assert _hashes(v1) == mask_builds["before"]
    report = verify_folder(str(converted))
    assert report.ok, report.format()
    assert report.rows_checked == 12 and (converted / "README.md").exists()


def test_converted_v2_shards_read_with_datasets(mask_builds, tmp_path):
    from datasets import load_dataset

    converted = mask_builds["converted"]
    files = sorted(str(p) for p in (converted / "data").glob("*.parquet"))
    ds = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == 12
    rows = decode_rows(ds.data.table)
    direct = _rows(converted)
    assert np.array_equal(rows.states, np.concatenate([r.states for r in direct]))
    assert np.array_equal(rows.ids, np.arange(12))


def test_uniform_source_converts_bit_exactly(tmp_path, tiny_language):
    from tsdfm.models.checkpoint import save_checkpoint
    from tsdfm.models.train.common import seeded

    cfg = teacher_config(
        tiny_language.vocab_size,
        tiny_language.seq_len,
        source="uniform",
        d_model=32,
        n_layers=2,
        n_heads=2,
        data={"kind": "synthetic", "language": "language.json"},
    )
    with seeded(0):
        model = FlowModel(cfg).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    teacher = tmp_path / "uniform-teacher"
    language = {"language.json": json.dumps(tiny_language.to_dict())}
    save_checkpoint(teacher, model, tiny_language.tokenizer(), language)
    v1 = _build(_cfg(teacher, schema_version=1), tmp_path / "v1")
    v2 = _build(_cfg(teacher), tmp_path / "v2")  # v2's default: no text column
    converted = tmp_path / "converted"
    summary = convert(str(v1), str(converted), text=False)
    assert not summary.text
    rows_v1, rows_c = _rows(v1), _rows(converted)
    # uniform states change tokens that were not [MASK]: stored as changed positions
    table = pq.read_table(next((converted / "data").glob("*.parquet")))
    assert table.column("mask_token").null_count == table.num_rows
    assert sum(len(c) for c in table.column("changed_positions").to_pylist()[0]) > 0
    for a, b in zip(rows_v1, rows_c, strict=True):
        assert np.array_equal(a.states, b.states)
        assert b.text == [None] * b.num_rows
    for a, b in zip(_rows(v2), rows_c, strict=True):
        assert np.array_equal(a.states, b.states) and np.array_equal(a.ids, b.ids)
    assert _shard_hashes(converted) == _shard_hashes(v2)
    assert verify_folder(str(converted)).ok


def test_an_interrupted_conversion_resumes_to_the_same_dataset(mask_builds, tmp_path):
    v1, reference = mask_builds["v1"], mask_builds["converted"]
    out = tmp_path / "out"

    def stop(line: str) -> None:
        raise KeyboardInterrupt  # after the first shard is committed and recorded

    with pytest.raises(KeyboardInterrupt):
        convert(str(v1), str(out), say=stop)
    assert Manifest.load(str(out)).committed() == [0]
    assert not (out / "README.md").exists()  # not finished, and verify says so
    report = verify_folder(str(out))
    assert not report.ok and any("missing" in p.what for p in report.problems)
    summary = convert(str(v1), str(out))
    assert summary.skipped == [0] and summary.converted == [1]
    assert _shard_hashes(out) == _shard_hashes(reference)
    assert verify_folder(str(out)).ok
    again = convert(str(v1), str(out))  # a finished conversion: nothing to do
    assert again.converted == [] and again.skipped == [0, 1]


def test_refusals_are_one_line_and_write_nothing(mask_builds, tmp_path):
    v1, v2 = mask_builds["v1"], mask_builds["v2"]
    out = tmp_path / "out"
    with pytest.raises(DataError, match="already trajectory schema v2"):
        convert(str(v2), str(out))
    with pytest.raises(DataError, match=r"no manifest\.json"):
        convert(str(tmp_path), str(out))
    unknown = tmp_path / "v9"
    shutil.copytree(v1, unknown)
    manifest = json.loads((unknown / "manifest.json").read_text())
    (unknown / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 9}))
    with pytest.raises(DataError, match="schema v9"):
        convert(str(unknown), str(out))
    with pytest.raises(ConfigError, match="overlaps the source"):
        convert(str(v1), str(v1 / "v2"))
    other = tmp_path / "other"
    shutil.copytree(v2, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    with pytest.raises(ConfigError, match="holds another dataset"):
        convert(str(v1), str(other))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        convert(str(v1), str(tmp_path / "busy"))
    assert not out.exists() and not (v1 / "v2").exists()
    # an altered source shard is refused before its v2 form is recorded
    altered = tmp_path / "altered"
    shutil.copytree(v1, altered)
    shard = next((altered / "data").glob("train-00001-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-9] + b"x" * 9)
    with pytest.raises(DataError, match="source was altered"):
        convert(str(altered), str(out))
    assert Manifest.load(str(out)).committed() == [0]  # the good shard stays, resumable

    # the command line: one line on stderr, exit 2
    res = CliRunner().invoke(app, ["convert", str(v2), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "already trajectory schema v2" in res.output


def test_the_command_converts_and_reports(mask_builds, tmp_path):
    out = tmp_path / "cli"
    report = tmp_path / "convert.json"
    res = CliRunner().invoke(
        app, ["convert", str(mask_builds["v1"]), "--out", str(out), "--json", str(report)]
    )
    assert res.exit_code == 0, res.output
    assert "schema v2, 12 rows in 2 converted" in res.output
    body = json.loads(report.read_text())
    assert body["converted"] == [0, 1] and body["text"] is True
    assert _shard_hashes(out) == _shard_hashes(mask_builds["v2"])
