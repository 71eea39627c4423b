"""Consumer-side integrity: distill checks sha256 against the manifest and the row contract."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint
from tsdfm.models.data.schema import decode_rows, encode_state_columns, layout_version
from tsdfm.models.data.trajectories import LoaderConfig, TrajectoryLoader, open_trajectory_dataset
from tsdfm.models.errors import DataError, ShardError
from tsdfm.models.train.distill import DistillConfig, train_student

SHARD1 = "data/train-00001-of-00003.parquet"
SHARD2 = "data/train-00002-of-00003.parquet"
MASK = 12  # the tiny teacher: V = 12 data tokens, [MASK] = 12


def _cfg(data, init, out, **kw) -> DistillConfig:
    base = dict(
        data=str(data),
        init=str(init),
        out=str(out),
        steps=2,
        batch_size=8,
        warmup=1,
        streams=1,
        shuffle_buffer=4,
        heldout_fraction=0.0,
        checkpoint_every=100,
        eval_every=100,
        log_every=1,
        precision="fp32",
        device="cpu",
        num_workers=0,
    )
    base.update(kw)
    return DistillConfig(**base)


def _column(path, part: str) -> str:
    """The column that stores ``part`` in the shard's schema version (v2 states: tokens)."""
    names = pq.ParquetFile(path).schema_arrow.names
    return "tokens" if part == "states" and "tokens" in names else part


def _flip_bit(path, part: str) -> None:
    """Flip one bit in the middle of ``part``: a column's chunk, or the footer's metadata."""
    part = _column(path, part)
    data = bytearray(path.read_bytes())
    if part == "footer":
        at = data.rindex(b"teacher_identity") + 4
    else:
        rg = pq.ParquetFile(path).metadata.row_group(0)
        chunk = next(
            rg.column(j)
            for j in range(rg.num_columns)
            if rg.column(j).path_in_schema.split(".")[0] == part
        )
        at = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_rows(path, edit) -> None:
    """Rewrite a shard with edit(ids, states) applied (metadata kept; the manifest goes stale).
    The edited states are stored as the shard's schema version stores them (v2: a row that
    no longer follows the mask source is stored by its changes)."""
    pf = pq.ParquetFile(path)
    table = pf.read()
    ids = table.column("trajectory_id").to_numpy().copy()
    states = decode_rows(table).states.copy()
    edit(ids, states)
    schema = table.schema
    table = table.set_column(0, schema.field("trajectory_id"), pa.array(ids, pa.int64()))
    for name, column in encode_state_columns(states, layout_version(schema.names)).items():
        j = table.column_names.index(name)
        table = table.set_column(j, schema.field(j), column)
    pq.write_table(table, path)


@pytest.mark.parametrize("part", ["trajectory_id", "times", "states", "footer"])
def test_one_flipped_bit_is_refused_in_one_line_naming_the_shard(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher, part
):
    from tsdfm.pipeline.cli import app

    data = shutil.copytree(tiny_blind_dataset, tmp_path / "data")
    _flip_bit(data / SHARD1, part)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            *("distill", "--data", str(data), "--init", str(saved_tiny_teacher)),
            *("--out", str(out), "--steps", "2", "--batch-size", "8", "--streams", "1"),
            *("--num-workers", "0", "--device", "cpu", "--eval-samples", "0"),
        ],
    )
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith(f"error: shard {SHARD1} has sha256 ")
    assert f"run `tsdfm-pipeline verify {data.resolve()}` and rebuild the shard" in lines[0]
    assert not (out / "final").exists()


def test_a_shard_that_changes_after_opening_is_refused_when_read(tmp_path, tiny_blind_dataset):
    data = shutil.copytree(tiny_blind_dataset, tmp_path / "data")
    source = open_trajectory_dataset(data)
    _flip_bit(data / SHARD2, "states")
    loader = iter(TrajectoryLoader(source, LoaderConfig(batch_size=8, streams=1)))
    with pytest.raises(DataError, match=f"shard {SHARD2} has sha256 .* verify {data.resolve()}"):
        for _ in range(100):
            next(loader)


def _break_reveal_once(ids, states):
    row, k = 3, 1
    pos = int(np.flatnonzero(states[row, k] != MASK)[0])  # revealed at t_1 …
    states[row, k + 1 :, pos] = (states[row, k, pos] + 1) % MASK  # … then changes


def _negative_token(ids, states):
    states[5, -1, 0] = -3


def _mask_left_at_one(ids, states):
    states[0, -1, 2] = MASK


def _token_out_of_range(ids, states):
    states[6, 2, 1] = MASK + 1


def _x0_not_masked(ids, states):
    states[7, 0, 4] = 3


def _shifted_id(ids, states):
    ids[4] += 1


@pytest.mark.parametrize(
    ("edit", "row", "broken"),
    [
        (_break_reveal_once, 3, "revealed once, never re-masked"),
        (_negative_token, 5, "token ids ≥ 0"),
        (_mask_left_at_one, 0, "no [MASK] left at t = 1"),
        (_token_out_of_range, 6, "token ids ≤ [MASK] = 12 before t = 1"),
        (_x0_not_masked, 7, "x_0 is all [MASK] = 12"),
        (_shifted_id, 4, "trajectory_id = shard·R + row"),
    ],
)
def test_without_a_manifest_every_row_read_is_checked(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher, edit, row, broken
):
    data = shutil.copytree(tiny_blind_dataset, tmp_path / "data")
    (data / "manifest.json").unlink()
    _edit_rows(data / SHARD2, edit)
    with pytest.raises(DataError) as e:
        train_student(_cfg(data, saved_tiny_teacher, tmp_path / "run", steps=30))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"shard {SHARD2}, row {row} (trajectory_id ")
    assert "breaks the dataset contract" in msg and broken in msg and "tsdfm-pipeline verify" in msg
    assert not (tmp_path / "run" / "final").exists()


def test_no_verify_trains_on_the_bytes_as_they_are_and_says_so(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher
):
    checked = train_student(_cfg(tiny_blind_dataset, saved_tiny_teacher, tmp_path / "a"))
    checked_prov = load_checkpoint(checked.final_dir, role="student").config.provenance
    assert checked_prov["verification"] == {
        "verified": True,
        "sha256": f"every shard against {tiny_blind_dataset.resolve()}/manifest.json",
        "rows": "every row read",
    }
    data = shutil.copytree(tiny_blind_dataset, tmp_path / "data")
    _edit_rows(data / SHARD2, _break_reveal_once)  # the manifest's sha256 is now stale
    with pytest.raises(ShardError, match=f"shard {SHARD2} has .*, manifest.json records"):
        train_student(_cfg(data, saved_tiny_teacher, tmp_path / "b"))
    res = train_student(_cfg(data, saved_tiny_teacher, tmp_path / "b", verify=False))
    prov = load_checkpoint(res.final_dir, role="student").config.provenance
    assert prov["verification"]["verified"] is False
    assert prov["verification"]["sha256"] == "off (--no-verify)"
    assert "verify" not in prov["run_config"]  # not part of the run's identity (resume)


def test_the_split_must_be_exactly_the_recorded_shards(tmp_path, tiny_blind_dataset):
    stray = shutil.copytree(tiny_blind_dataset, tmp_path / "stray")
    shutil.copy(stray / SHARD1, stray / "data/train-extra.parquet")
    with pytest.raises(ShardError, match=r"train-extra\.parquet is read as part of the train"):
        open_trajectory_dataset(stray)
    gone = shutil.copytree(tiny_blind_dataset, tmp_path / "gone")
    (gone / SHARD2).unlink()
    with pytest.raises(ShardError, match=f"shard {SHARD2} is recorded in manifest.json but not"):
        open_trajectory_dataset(gone)
    partial = shutil.copytree(tiny_blind_dataset, tmp_path / "partial")
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["shards"]["00002"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="records 2 of 3 planned shards; finish the build"):
        open_trajectory_dataset(partial)
    assert open_trajectory_dataset(partial, verify=False).files  # --no-verify reads what is there


def test_without_a_manifest_a_shard_that_does_not_decode_is_one_line(tmp_path, tiny_blind_dataset):
    data = shutil.copytree(tiny_blind_dataset, tmp_path / "data")
    (data / "manifest.json").unlink()
    path = data / SHARD1
    rg = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(
        rg.column(j)
        for j in range(rg.num_columns)
        if rg.column(j).path_in_schema.startswith(_column(path, "states"))
    )
    raw = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    raw[middle - 16 : middle + 16] = bytes(32)  # zeros over the compressed pages
    path.write_bytes(bytes(raw))
    loader = iter(TrajectoryLoader(open_trajectory_dataset(data), LoaderConfig(batch_size=8)))
    with pytest.raises(DataError, match=f"shard {SHARD1} does not decode") as e:
        for _ in range(100):
            next(loader)
    assert "\n" not in str(e.value) and f"tsdfm-pipeline verify {data.resolve()}" in str(e.value)
