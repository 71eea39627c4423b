"""The dataset contract (schema, TrajectoryBatch) and the shard writer/reader, on schema v1
(v2: tests/test_schema_v2.py)."""

from __future__ import annotations

import hashlib
import os
import re

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tsdfm.models.data.schema import (
    METADATA_KEY,
    SCHEMA_VERSION,
    TrajectoryBatch,
    from_arrow,
    to_arrow,
    trajectory_schema,
)
from tsdfm.models.errors import DataError, ShardError
from tsdfm.models.hashing import file_sha256
from tsdfm.pipeline import shards
from tsdfm.pipeline.shards import (
    cleanup_temp,
    default_row_group_rows,
    read_shard,
    shard_name,
    write_shard,
)

SHAPED = (False, True, True, False)  # S = 4: the first and last segments are blind
V1 = {"schema_version": 1}  # these tests write schema v1 (the writer's default is v2)


def make_batch(
    shard: int = 3,
    start: int = 0,
    B: int = 6,
    L: int = 8,
    K: int = 3,
    shaped: tuple[bool, ...] = SHAPED,
    text: bool = True,
) -> TrajectoryBatch:
    """B trajectories of shard ``shard`` with ids start … start+B-1, as torch tensors."""
    S = len(shaped)
    g = torch.Generator().manual_seed(1000 * shard + start)
    mask = torch.tensor(shaped)
    chosen = torch.randint(0, K, (B, S), generator=g) * mask
    return TrajectoryBatch(
        trajectory_id=torch.arange(start, start + B) + shard * 1000,
        shard=shard,
        seed=torch.arange(start, start + B) * 7919 + 11,
        times=torch.linspace(0, 1, S + 1, dtype=torch.float64),
        states=torch.randint(0, 50, (B, S + 1, L), generator=g),
        energies=torch.randn(B, S, K, generator=g, dtype=torch.float64),
        shaped=mask,
        chosen=chosen,
        text=[None if i % 4 == 1 else f"trajectory {start + i}" for i in range(B)]
        if text
        else None,
    )


# ---- schema --------------------------------------------------------------------------------


def test_schema_is_the_contract():
    schema = trajectory_schema(1)
    lst = lambda t: pa.list_(pa.field("element", t, nullable=False))  # noqa: E731
    expected = [
        ("trajectory_id", pa.int64(), False),
        ("shard", pa.int32(), False),
        ("seed", pa.int64(), False),
        ("times", lst(pa.float32()), False),
        ("states", lst(lst(pa.int32())), False),
        ("energies", lst(lst(pa.float32())), False),
        ("chosen", lst(pa.int16()), False),
        ("text", pa.string(), True),
    ]
    assert [(f.name, f.type, f.nullable) for f in schema] == expected
    assert schema.metadata is None
    assert SCHEMA_VERSION == 2 and METADATA_KEY == b"tsdfm"


def test_round_trip_is_exact_and_unshaped_segments_are_empty_lists():
    batch = make_batch()
    record = to_arrow(batch, 1)
    assert record.schema.equals(trajectory_schema(1))
    row = record.slice(1, 1).to_pylist()[0]
    assert [len(e) for e in row["energies"]] == [0, 3, 3, 0]
    assert row["chosen"][0] == 0 and row["chosen"][3] == 0
    assert row["times"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(row["states"]) == 5 and all(len(s) == 8 for s in row["states"])
    assert row["states"] == batch.states[1].tolist()
    assert row["energies"][1] == batch.energies[1, 1].tolist()
    assert row["text"] is None and record.column("text")[0].as_py() == "trajectory 0"

    back = from_arrow(record)
    assert back.equals(batch)
    assert back.states.dtype == np.int32 and back.energies.dtype == np.float32
    assert back.chosen.dtype == np.int16 and back.shaped.tolist() == list(SHAPED)
    assert np.isnan(back.energies[:, ~back.shaped]).all()
    # a table of several chunks, sliced, gives the matching rows
    table = pa.Table.from_batches([record, to_arrow(make_batch(start=6), 1)]).slice(4, 5)
    assert from_arrow(table).trajectory_id.tolist() == [3004, 3005, 3006, 3007, 3008]


def test_round_trip_of_blind_batch_without_text():
    batch = make_batch(shaped=(False, False), K=4, text=False)
    record = to_arrow(batch, 1)
    assert record.column("text").null_count == batch.num_rows
    assert all(e == [[], []] for e in record.column("energies").to_pylist())
    assert from_arrow(record, num_candidates=4).equals(batch)
    assert from_arrow(record).num_candidates == 1  # K unknowable: the blind baseline
    with pytest.raises(DataError, match="K = 4 candidates, not 2"):
        from_arrow(to_arrow(make_batch(K=4), 1), num_candidates=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"states": torch.zeros(6, 4, 8, dtype=torch.long)}, r"states has shape \(6, 4, 8\)"),
        ({"energies": torch.zeros(6, 4)}, r"energies has shape \(6, 4\), expected \(6, 4, \?\)"),
        ({"times": torch.tensor([0.0, 0.5, 0.5, 0.75, 1.0])}, "strictly increasing"),
        ({"chosen": torch.ones(6, 4, dtype=torch.long)}, "0 in segments that were not shaped"),
        ({"chosen": torch.full((6, 4), 3) * torch.tensor(SHAPED)}, r"outside the int16 range"),
        ({"states": torch.full((6, 5, 8), 2**31)}, r"outside the int32 range"),
        ({"text": ["a"]}, "text has 1 entries for B = 6"),
        ({"shaped": torch.ones(4)}, "shaped must be a bool mask"),
    ],
)
def test_batch_validation_names_the_problem(change, message):
    fields = {f: getattr(make_batch(), f) for f in TrajectoryBatch.__dataclass_fields__}
    with pytest.raises(DataError, match=message):
        TrajectoryBatch(**{**fields, **change})


def test_from_arrow_rejects_foreign_tables():
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['energies'\]"):
        from_arrow(pa.Table.from_batches([to_arrow(make_batch(), 1)]).drop_columns(["energies"]))
    mixed = pa.Table.from_batches([to_arrow(make_batch(), 1), to_arrow(make_batch(shard=4), 1)])
    with pytest.raises(DataError, match="several shards"):
        from_arrow(mixed)


# ---- shard files ---------------------------------------------------------------------------


def test_shard_name():
    assert shard_name(3, 8) == "data/train-00003-of-00008.parquet"
    assert shard_name(0, 99_999) == "data/train-00000-of-99999.parquet"
    with pytest.raises(ShardError, match=r"shard index 8 is outside \[0, 8\)"):
        shard_name(8, 8)


def test_same_rows_give_identical_bytes(tmp_path):
    rows = [make_batch(start=0), make_batch(start=6), make_batch(start=12)]
    meta = {**V1, "fingerprint": "abc", "config": {"K": 3, "tau": 0.25}}
    a = write_shard(str(tmp_path / "a"), 3, 8, rows, meta, row_group_rows=5)
    # same rows, batched differently and given as Arrow, metadata keys in another order
    table = pa.Table.from_batches([to_arrow(b, 1) for b in rows])
    split = [table.slice(0, 4), table.slice(4, 11), table.slice(15)]
    b = write_shard(
        str(tmp_path / "b"), 3, 8, split, dict(reversed(meta.items())), row_group_rows=5
    )
    assert a == b
    assert a.path == "data/train-00003-of-00008.parquet" and a.rows == 18 and a.index == 3
    data = (tmp_path / "a" / a.path).read_bytes()
    assert data == (tmp_path / "b" / b.path).read_bytes()
    assert a.bytes == len(data) and a.sha256 == hashlib.sha256(data).hexdigest()
    # no timestamp anywhere: the only writer-dependent field is the library version
    assert pq.read_metadata(tmp_path / "a" / a.path).created_by == (
        f"parquet-cpp-arrow version {pa.__version__}"
    )
    assert os.listdir(tmp_path / "a" / "data") == ["train-00003-of-00008.parquet"]


def test_file_metadata_and_parquet_options(tmp_path):
    info = write_shard(str(tmp_path), 3, 8, [make_batch()], {**V1, "fingerprint": "abc", "seed": 7})
    md = pq.read_metadata(tmp_path / info.path)
    assert set(md.metadata) == {b"ARROW:schema", b"tsdfm"}  # never b"huggingface"
    assert md.metadata[b"tsdfm"] == (
        b'{"fingerprint":"abc","num_shards":8,"schema_version":1,"seed":7,"shard":3}'
    )
    columns = [md.row_group(0).column(i) for i in range(md.num_columns)]
    assert {c.compression for c in columns} == {"ZSTD"}
    assert all(c.has_offset_index and c.has_column_index for c in columns)

    table, meta = read_shard(str(tmp_path), info.path)
    assert meta == {
        "fingerprint": "abc",
        "num_shards": 8,
        "schema_version": 1,
        "seed": 7,
        "shard": 3,
    }
    assert table.schema.equals(trajectory_schema(1), check_metadata=True)
    assert from_arrow(table).equals(make_batch())


def _encodings(path) -> dict[str, tuple[str, ...]]:
    md = pq.read_metadata(path)
    group = md.row_group(0)
    return {
        group.column(i).path_in_schema: group.column(i).encodings for i in range(md.num_columns)
    }


def test_v2_energies_are_stored_plain_the_rest_dictionary_encoded(tmp_path):
    v2 = {"schema_version": 2, "config": {"schema_version": 2}}
    info = write_shard(str(tmp_path / "v2"), 3, 8, [make_batch(text=False)], v2)
    enc = _encodings(tmp_path / "v2" / info.path)
    # the writer names the leaves as Parquet does
    assert set(enc) == {shards.leaf_path(f) for f in trajectory_schema(2, text=False)}
    energies = "energies.list.element.list.element"
    assert "RLE_DICTIONARY" not in enc[energies] and "PLAIN" in enc[energies]
    assert all("RLE_DICTIONARY" in e for c, e in enc.items() if c != energies)
    # v1 keeps its dictionary everywhere (its bytes do not change)
    info = write_shard(str(tmp_path / "v1"), 3, 8, [make_batch()], V1)
    assert all("RLE_DICTIONARY" in e for e in _encodings(tmp_path / "v1" / info.path).values())
    table, _ = read_shard(str(tmp_path / "v2"), info.path)
    assert np.array_equal(
        from_arrow(table).energies,
        make_batch().energies.astype(np.float16).astype(np.float32),
        equal_nan=True,
    )


def test_failed_write_leaves_no_file_under_any_name(tmp_path):
    def rows():
        yield make_batch(start=0)
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        write_shard(str(tmp_path), 3, 8, rows(), V1, row_group_rows=4)  # one group was written
    assert os.listdir(tmp_path / "data") == []

    with pytest.raises(ShardError, match="carry other shard indices"):
        write_shard(str(tmp_path), 3, 8, [make_batch(shard=3), make_batch(shard=5)], V1)
    assert os.listdir(tmp_path / "data") == []


def test_failed_rewrite_keeps_the_committed_shard(tmp_path, monkeypatch):
    info = write_shard(str(tmp_path), 3, 8, [make_batch()], V1)
    calls, seen = [], []

    def broken(self, table, row_group_size=None):
        calls.append(table.num_rows)
        if len(calls) == 2:
            seen.extend(sorted(os.listdir(tmp_path / "data")))
            raise OSError("disk full")
        return original(self, table, row_group_size)

    original = pq.ParquetWriter.write_table
    monkeypatch.setattr(pq.ParquetWriter, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_shard(str(tmp_path), 3, 8, [make_batch(B=10)], V1, row_group_rows=4)
    assert calls == [4, 4]
    # midway, the new bytes lived under a hidden temp name beside the intact committed shard
    assert len(seen) == 2 and seen[1] == "train-00003-of-00008.parquet"
    assert re.fullmatch(r"\.train-00003-of-00008\.parquet\.tmp-[0-9a-f]{16}", seen[0])
    assert os.listdir(tmp_path / "data") == ["train-00003-of-00008.parquet"]
    assert file_sha256(str(tmp_path / info.path), fsspec.filesystem("file")) == info.sha256


def test_row_groups_are_capped(tmp_path, monkeypatch):
    batches = [make_batch(start=s, B=10) for s in range(0, 50, 10)]
    info = write_shard(str(tmp_path / "a"), 3, 8, batches, V1, row_group_rows=16)
    md = pq.read_metadata(tmp_path / "a" / info.path)
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [16, 16, 16, 2]

    # default cap from the row shape: S=4, L=8, K=3 with 2 shaped segments is
    # 8+4+8 (ids) + 4*5 (times) + 2*4 (chosen) + 4*5*8 (states) + 4*2*3 (energies) = 232 bytes
    table = pa.Table.from_batches([to_arrow(make_batch(), 1)])
    assert default_row_group_rows(table) == shards.MAX_ROW_GROUP_ROWS  # 32 MiB / 464 > 65536
    monkeypatch.setattr(shards, "ROW_GROUP_TARGET_BYTES", 8 * 1024)
    info = write_shard(str(tmp_path / "b"), 3, 8, batches, V1)
    md = pq.read_metadata(tmp_path / "b" / info.path)
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert sizes == [17, 17, 16]  # 8192 // (2 * 232)
    assert max(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) < 8 * 1024


def test_memory_filesystem_and_cleanup():
    root = "memory://tsdfm-test-shards/ds"
    fs = fsspec.filesystem("memory")
    try:
        info = write_shard(root, 3, 8, [make_batch()], {**V1, "fingerprint": "abc"})
        path = "/tsdfm-test-shards/ds/" + info.path
        assert fs.exists(path) and fs.size(path) == info.bytes
        assert file_sha256(path, fs) == info.sha256
        table, meta = read_shard(root, info.path)
        assert from_arrow(table).equals(make_batch()) and meta["fingerprint"] == "abc"
        fs.pipe("/tsdfm-test-shards/ds/data/.train-00004-of-00008.parquet.tmp-0123abcd", b"x")
        fs.pipe("/tsdfm-test-shards/ds/.manifest.json.tmp-ff00", b"{")
        removed = cleanup_temp(root)
        assert [p.rpartition("/")[2] for p in removed] == [
            ".manifest.json.tmp-ff00",
            ".train-00004-of-00008.parquet.tmp-0123abcd",
        ]
        assert fs.ls("/tsdfm-test-shards/ds/data", detail=False) == [path]
    finally:
        fs.rm("/tsdfm-test-shards", recursive=True)


def test_cleanup_temp_on_local_disk(tmp_path):
    assert cleanup_temp(str(tmp_path / "nothing-here")) == []
    info = write_shard(str(tmp_path), 0, 2, [make_batch(shard=0)], V1)
    (tmp_path / "data" / ".train-00001-of-00002.parquet.tmp-deadbeef").write_bytes(b"partial")
    (tmp_path / "notes.tmp-1").write_text("not ours: no leading dot")
    assert len(cleanup_temp(str(tmp_path))) == 1
    assert sorted(os.listdir(tmp_path / "data")) == [info.path.split("/")[1]]
    assert (tmp_path / "notes.tmp-1").exists()


def test_read_shard_errors(tmp_path):
    with pytest.raises(ShardError, match="does not exist: rerun the build"):
        read_shard(str(tmp_path), shard_name(0, 1))
    (tmp_path / "data").mkdir()
    (tmp_path / shard_name(0, 1)).write_bytes(b"not parquet at all")
    with pytest.raises(ShardError, match="not a readable Parquet file"):
        read_shard(str(tmp_path), shard_name(0, 1))
    pq.write_table(pa.table({"x": [1]}), tmp_path / shard_name(0, 1))
    with pytest.raises(ShardError, match="no 'tsdfm' metadata"):
        read_shard(str(tmp_path), shard_name(0, 1))


def test_write_shard_refuses_bad_metadata_and_rows(tmp_path):
    with pytest.raises(ShardError, match="shard metadata says shard=4, the shard is 3"):
        write_shard(str(tmp_path), 3, 8, [make_batch()], {"shard": 4})
    with pytest.raises(ShardError, match="not plain JSON"):
        write_shard(str(tmp_path), 3, 8, [make_batch()], {"gain": float("nan")})
    foreign = pa.table({"trajectory_id": pa.array([1], pa.int64())})
    with pytest.raises(ShardError, match="do not have the shard's trajectory schema v1"):
        write_shard(str(tmp_path), 3, 8, [foreign], V1)
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []


def test_datasets_reads_a_shard_with_the_contract_features(tmp_path):
    datasets = pytest.importorskip("datasets")
    info = write_shard(str(tmp_path / "ds"), 3, 8, [make_batch()], {**V1, "fingerprint": "abc"})
    ds = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "ds" / info.path),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    F = datasets.Features
    V = datasets.Value
    List = datasets.List
    assert ds.features == F(
        {
            "trajectory_id": V("int64"),
            "shard": V("int32"),
            "seed": V("int64"),
            "times": List(V("float32")),
            "states": List(List(V("int32"))),
            "energies": List(List(V("float32"))),
            "chosen": List(V("int16")),
            "text": V("string"),
        }
    )
    assert ds.num_rows == 6
    batch = make_batch()
    assert ds[2]["states"] == batch.states[2].tolist()
    assert ds[2]["energies"][0] == [] and ds[2]["energies"][1] == batch.energies[2, 1].tolist()
    assert ds[1]["text"] is None and ds[0]["text"] == "trajectory 0"


def test_urls_without_a_filesystem_are_one_line(monkeypatch):
    with pytest.raises(ShardError, match=r"nosuch://b/ds: Protocol not known: nosuch; use a local"):
        shards.open_root("nosuch://b/ds")

    def missing_backend(url, **kwargs):
        raise ImportError("Install s3fs to access S3")  # what fsspec says without s3fs

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing_backend)
    with pytest.raises(ShardError, match=r"not installed \(Install s3fs to access S3\)"):
        shards.open_root("s3://bucket/ds")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        (b"{not json", "is not JSON"),
        (b'"a string"', "is a JSON str, not an object"),
        (b'{"x": "' + b"j" * 300_000 + b'"}', "over the 262,144-byte bound"),
    ],
)
def test_unusable_metadata_is_named_not_parsed_blindly(tmp_path, raw, problem):
    """Before: a RecursionError traceback, or "no tsdfm metadata" for metadata that was there."""
    meta, why = shards.parse_metadata(raw)
    assert meta is None and problem in why
    table = pa.Table.from_batches([to_arrow(make_batch(shard=0), 1)])
    (tmp_path / "data").mkdir()
    pq.write_table(table.replace_schema_metadata({"tsdfm": raw}), tmp_path / shard_name(0, 1))
    with pytest.raises(ShardError, match=re.escape(problem)):
        read_shard(str(tmp_path), shard_name(0, 1))


def test_writer_refuses_rows_that_break_the_contract(tmp_path):
    """The writer checks the same row invariants as verify (RowRules from the config)."""
    config = {
        "trajectories_per_shard": 6,
        "seed": 0,
        "navigator": {"student_steps": 4, "teacher_steps": 8, "candidates": 3, "tau": 0.25},
    }
    good = make_batch(shard=3, B=6, shaped=(False, True, True, True))  # τ = 0.25
    ids = good.trajectory_id - 3000 + 18  # shard 3 · 6 rows per shard + row
    seeds = ids  # dataset seed 0: seed = 0 · 2^32 + id
    fields = {f: getattr(good, f) for f in TrajectoryBatch.__dataclass_fields__}
    ok = TrajectoryBatch(**{**fields, "trajectory_id": ids, "seed": seeds})
    info = write_shard(str(tmp_path / "ok"), 3, 8, [ok], {**V1, "config": config})
    assert info.rows == 6
    shifted = TrajectoryBatch(**{**fields, "trajectory_id": ids + 1, "seed": seeds + 1})
    with pytest.raises(ShardError, match=r"shard 3, row 0 \(trajectory_id 19\), breaks the data"):
        write_shard(str(tmp_path / "bad"), 3, 8, [shifted], {**V1, "config": config})
    blind = {**config, "navigator": {**config["navigator"], "candidates": 1}}
    with pytest.raises(ShardError, match=r"'0 ≤ chosen < K = 1'"):
        write_shard(str(tmp_path / "bad"), 3, 8, [ok], {**V1, "config": blind})
    grid = TrajectoryBatch(
        **{**fields, "trajectory_id": ids, "seed": seeds, "times": [0, 1, 2, 3, 4]}
    )
    with pytest.raises(ShardError, match=r"'times increase strictly from 0 to 1'.*nothing was"):
        write_shard(str(tmp_path / "bad"), 3, 8, [grid], {**V1, "config": config})
    assert not (tmp_path / "bad" / "data").exists() or os.listdir(tmp_path / "bad" / "data") == []


def test_one_footer_reader_names_every_metadata_problem():
    from tsdfm.models.data.schema import MetadataError, decode_metadata

    meta = {"schema_version": 1, "shard": 0}
    assert decode_metadata(b'{"schema_version": 1, "shard": 0}') == meta
    with pytest.raises(MetadataError, match="no 'tsdfm' metadata"):
        decode_metadata(None)
    with pytest.raises(MetadataError, match=r"unknown key\(s\) \['seed'\]") as e:
        decode_metadata(b'{"shard": 0, "seed": 7}')
    assert e.value.metadata == {"shard": 0, "seed": 7}  # a lenient reader may use it
    assert decode_metadata(b'{"shard": 0, "seed": 7}', strict=False) == {"shard": 0, "seed": 7}
