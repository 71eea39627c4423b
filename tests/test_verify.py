"""`verify`: every problem of a damaged dataset is found and reported (tiny real datasets)."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tsdfm.models.data.schema import layout_version, trajectory_schema, transcode
from tsdfm.models.errors import DataError
from tsdfm.models.hashing import canonical_json, file_sha256
from tsdfm.pipeline.card import write_card
from tsdfm.pipeline.cli import app
from tsdfm.pipeline.manifest import Manifest
from tsdfm.pipeline.shards import ShardInfo, read_shard, shard_name
from tsdfm.pipeline.verify import choose_replay, parse_target, verify

runner = CliRunner()
SHARD = [shard_name(i, 3) for i in range(3)]


@pytest.fixture()
def shaped(tmp_path, tiny_shaped_dataset):
    return shutil.copytree(tiny_shaped_dataset, tmp_path / "shaped")


@pytest.fixture()
def blind(tmp_path, tiny_blind_dataset):
    return shutil.copytree(tiny_blind_dataset, tmp_path / "blind")


def _where(report) -> list[str]:
    return [p.where for p in report.problems]


def _text(report) -> str:
    return "\n".join(str(p) for p in report.problems)


def test_clean_datasets_pass(tiny_blind_dataset, tiny_shaped_dataset):
    for root in (tiny_blind_dataset, tiny_shaped_dataset):
        report = verify(str(root))
        assert report.ok, report.format()
        assert report.shards_checked == [0, 1, 2]
        assert report.rows_checked == 24
        assert "OK: no problems found" in report.format()


def test_flipped_byte_is_caught(shaped):
    path = shaped / SHARD[1]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    path.write_bytes(bytes(raw))
    report = verify(str(shaped))
    assert not report.ok
    assert set(_where(report)) == {SHARD[1]}
    assert "sha256" in _text(report) and "rebuild it" in _text(report)


def test_missing_shard_is_caught(shaped):
    (shaped / SHARD[2]).unlink()
    report = verify(str(shaped))
    assert _where(report) == [SHARD[2]]
    assert "missing" in report.problems[0].what
    assert report.shards_checked == [0, 1]


def test_truncated_shard_is_caught(shaped):
    path = shaped / SHARD[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    report = verify(str(shaped))
    text = _text(report)
    assert set(_where(report)) == {SHARD[0]}
    assert f"{len(data) // 2} bytes, the manifest records {len(data)}" in text
    assert "not a readable Parquet file" in text
    assert report.shards_checked == [1, 2]


def _edit_manifest(root, edit) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def test_tampered_manifest_is_caught(shaped):
    # a recorded checksum, a row count and the config's seed edited by hand
    def edit(m):
        m["shards"]["00001"]["sha256"] = "0" * 64
        m["shards"]["00002"]["rows"] = 9
        m["plan"]["config"]["seed"] = 4

    _edit_manifest(shaped, edit)
    report = verify(str(shaped))
    text = _text(report)
    assert "sha256" in text and SHARD[1] in _where(report)
    assert "shard 00002 is recorded with 9 rows" in text
    assert "totals 24 rows" in text  # totals no longer match the entries
    assert "is not the fingerprint of the recorded config" in text
    assert f"{SHARD[0]}: metadata config" in text  # shards disagree with the edited config
    assert "dataset_info says 24 train examples, the manifest 25" in text  # card vs manifest


def test_manifest_that_is_not_json_still_checks_the_shards(shaped):
    (shaped / "manifest.json").write_text("{ not json")
    report = verify(str(shaped))
    assert _where(report) == ["manifest.json"]
    assert "not valid JSON" in report.problems[0].what
    assert report.shards_checked == [0, 1, 2] and report.rows_checked == 24


def test_every_problem_is_reported_not_just_the_first(shaped):
    raw = bytearray((shaped / SHARD[0]).read_bytes())
    raw[100] ^= 0xFF
    (shaped / SHARD[0]).write_bytes(bytes(raw))
    (shaped / SHARD[2]).unlink()
    shutil.copy(shaped / SHARD[1], shaped / "data" / "train-00000-of-00004.parquet")
    report = verify(str(shaped))
    where = set(_where(report))
    assert {SHARD[0], SHARD[2], "data/train-00000-of-00004.parquet"} <= where
    assert "would be read as part of the train split" in _text(report)


def _rewrite_shard(root, index: int, edit) -> None:
    """Rewrite shard ``index`` with edited rows and record it, so only the rows are wrong.

    The shard writer refuses rows that break the contract, so they are written by pyarrow
    itself (the metadata as the writer writes it). ``edit`` sees the rows as schema v1 lists
    (full states); they are stored back in the shard's own version (``transcode``)."""
    table, meta = read_shard(str(root), SHARD[index])
    rows = transcode(table, 1).to_pylist()
    edit(rows)
    bad = pa.Table.from_pylist(rows, schema=trajectory_schema(1))
    bad = transcode(bad, layout_version(table.schema.names), "text" in table.schema.names)
    path = root / SHARD[index]
    pq.write_table(bad.replace_schema_metadata({"tsdfm": canonical_json(meta)}), path)
    info = ShardInfo(index, SHARD[index], bad.num_rows, path.stat().st_size, file_sha256(path))
    manifest = Manifest.load(str(root))
    entry = manifest.shard(index)
    manifest.record_shard(info, entry["counters"], entry["stats"])
    write_card(str(root))


def test_rows_breaking_invariants_are_caught(shaped):
    mask = 12  # the tiny teacher: V = 12 data tokens, [MASK] = 12

    def edit(rows):
        rows[1]["chosen"][0] = 3  # K = 3 candidates: chosen must be < 3
        rows[2]["energies"][1][0] = float("nan")
        rows[3]["times"][2] = rows[3]["times"][1]  # not strictly increasing
        rows[4]["trajectory_id"] = 99
        # re-mask a position that was revealed at t_1
        r = rows[5]
        p = next(p for p, tok in enumerate(r["states"][1]) if tok != mask)
        r["states"][2][p] = mask
        rows[6]["states"][-1][0] = mask  # a [MASK] left at t = 1
        rows[7]["states"][0][0] = 13  # outside the vocabulary

    _rewrite_shard(shaped, 1, edit)
    report = verify(str(shaped))
    assert set(_where(report)) == {SHARD[1]}, report.format()
    found = {p.what.split("'")[1]: p.what for p in report.problems}
    assert "row(s) break" in report.problems[0].what
    assert "rows 1 (id 9)" in found["0 ≤ chosen < K = 3"]
    assert "rows 2 (id 10)" in found["energies are finite"]
    assert "rows 3 (id 11)" in found["times increase strictly from 0 to 1"]
    assert "rows 4 (id 99)" in found["trajectory_id = 1·8 + row"]
    assert (
        "rows 5 (id 13)"
        in found["a revealed position keeps its token (revealed once, never re-masked)"]
    )
    assert "rows 6 (id 14)" in found["no [MASK] left at t = 1"]
    assert "rows 7 (id 15)" in found["x_0 is all [MASK] = 12"]
    assert "rows 7 (id 15)" in found["token ids ≤ [MASK] = 12 before t = 1"]
    assert report.shards_checked == [0, 1, 2]


def test_blind_rows_must_have_empty_energies(blind):
    def edit(rows):
        rows[0]["energies"][0] = [0.5]  # K = 1: no segment is shaped

    _rewrite_shard(blind, 0, edit)
    report = verify(str(blind))
    assert len(report.problems) == 1
    assert "energies hold K = 1 values exactly in the shaped segments []" in report.problems[0].what


def test_card_that_disagrees_is_caught(shaped):
    card = (shaped / "README.md").read_text()
    (shaped / "README.md").write_text(card.replace("num_examples: 24", "num_examples: 23"))
    report = verify(str(shaped))
    assert _where(report) == ["README.md"]
    assert "23 train examples, the manifest 24" in report.problems[0].what


def test_not_a_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a tsdfm trajectory dataset"):
        verify(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    res = runner.invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 2
    assert "error:" in res.output and "not a tsdfm trajectory dataset" in res.output
    res = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_cli_exit_code_and_json_report(shaped, tmp_path):
    ok = runner.invoke(app, ["verify", str(shaped)])
    assert ok.exit_code == 0, ok.output
    assert "3 shard(s), 24 row(s) checked" in ok.output
    (shaped / SHARD[2]).unlink()
    out = tmp_path / "report.json"
    bad = runner.invoke(app, ["verify", str(shaped), "--json", str(out)])
    assert bad.exit_code == 1
    assert "FAILED: 1 problem(s)" in bad.output and SHARD[2] in bad.output
    body = json.loads(out.read_text())
    assert body["ok"] is False and body["problems"][0]["where"] == SHARD[2]
    assert body["rows_checked"] == 16


def test_replay_rebuilds_the_same_bytes(tiny_shaped_dataset):
    report = verify(str(tiny_shaped_dataset), replay=1, seed=5)
    assert report.ok, report.format()
    assert report.replayed == choose_replay([0, 1, 2], 1, None, 5, 3)
    assert len(report.replayed) == 1


def test_replay_catches_a_rewritten_shard(shaped):
    def edit(rows):
        rows[0]["energies"][2][0] += 0.5  # one candidate energy off (K = 3, τ = 0.25)

    _rewrite_shard(shaped, 1, edit)  # recorded in the manifest and the card
    assert verify(str(shaped)).ok  # energies are not checked against the compass ...
    report = verify(str(shaped), replay_shards=[1])  # ... but a replay compares bytes
    assert report.replayed == [1]
    assert _where(report) == [SHARD[1]]
    assert "replay gave different bytes" in report.problems[0].what


def test_choose_replay():
    assert choose_replay([0, 1, 2, 3], 2, None, 0, 4) == choose_replay([0, 1, 2, 3], 2, None, 0, 4)
    assert len(choose_replay([0, 1, 2, 3], 10, None, 0, 4)) == 4
    assert choose_replay([0, 1, 2], 0, [2, 0, 2], 0, 3) == [0, 2]
    with pytest.raises(Exception, match="outside the plan"):
        choose_replay([0, 1, 2], 0, [3], 0, 3)


def test_parse_target(tmp_path):
    assert parse_target("org/name") == ("org/name", None)
    assert parse_target("org/name@v2") == ("org/name", "v2")
    assert parse_target(str(tmp_path)) is None
    assert parse_target("./local/dir") is None
    assert parse_target("s3://bucket/ds") is None


def _with_metadata(root, name, raw: bytes) -> None:
    table = pq.read_table(root / name)
    pq.write_table(table.replace_schema_metadata({"tsdfm": raw}), root / name)


def test_metadata_is_bounded_strict_and_its_problem_named(shaped):
    """Before: unknown keys (a 50 MB junk string) passed, deep nesting was a RecursionError
    traceback, and metadata that was not JSON was reported as absent."""
    _, meta = read_shard(str(shaped), SHARD[0])
    _with_metadata(shaped, SHARD[0], json.dumps({**meta, "junk": "x"}).encode())
    _with_metadata(shaped, SHARD[1], b"[" * 100_000 + b"]" * 100_000)
    _with_metadata(shaped, SHARD[2], json.dumps({**meta, "junk": "j" * 300_000}).encode())
    report = verify(str(shaped))
    text = _text(report)
    assert "tsdfm metadata carries unknown key(s) ['junk']" in text
    assert "tsdfm key-value metadata nests too deeply to be a tsdfm record" in text
    assert "over the 262,144-byte bound" in text
    _with_metadata(shaped, SHARD[1], b"{not json")
    text = _text(verify(str(shaped)))
    assert "tsdfm key-value metadata is not JSON" in text and "no tsdfm" not in text


def test_inspect_checks_the_shown_shard_with_the_same_rules(shaped):
    from tsdfm.pipeline.inspect import inspect_dataset

    assert "row invariants: all 8 rows of shard 1 keep them" in inspect_dataset(str(shaped), 9)

    def edit(rows):
        rows[3]["trajectory_id"] = 42

    _rewrite_shard(shaped, 1, edit)
    text = inspect_dataset(str(shaped), 9)
    assert "row invariants: BROKEN, shard 1 row 3 (trajectory_id 42) breaks" in text
    assert "'trajectory_id = 1·8 + row'" in text and f"verify {shaped}" in text


def test_paths_read_from_files_are_confined(shaped):
    def edit(m):
        m["shards"]["00001"]["path"] = "../elsewhere/train-00001-of-00003.parquet"

    _edit_manifest(shaped, edit)
    card = (shaped / "README.md").read_text()
    (shaped / "README.md").write_text(card.replace("path: data/train-*.parquet", "path: /etc/*"))
    text = _text(verify(str(shaped)))
    assert "manifest.json shard 00001 path is '../elsewhere/" in text and "leads outside" in text
    assert "README.md configs[].data_files path is the absolute path '/etc/*'" in text
