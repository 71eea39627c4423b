"""manifest.json: plan, committed shards, checksums, fingerprint refusal, resume status."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pytest

from tsdfm.models import __version__
from tsdfm.models.data.schema import TrajectoryBatch
from tsdfm.models.errors import ConfigError, DataError
from tsdfm.pipeline.manifest import MANIFEST_FILE, Manifest, plan_status
from tsdfm.pipeline.shards import write_shard

PLAN = {"teacher": "sha256:aa", "K": 4, "tau": 0.25, "num_shards": 4, "rows_per_shard": 5}
FP = "fp-1111"


def batch(shard: int, rows: int = 5) -> TrajectoryBatch:
    """A tiny shard's rows: S=2 (second segment shaped), L=3, K=4."""
    rng = np.random.default_rng(shard)
    return TrajectoryBatch(
        trajectory_id=np.arange(rows) + shard * rows,
        shard=shard,
        seed=np.arange(rows) + 100 * shard,
        times=np.array([0.0, 0.5, 1.0]),
        states=rng.integers(0, 9, (rows, 3, 3)),
        energies=rng.standard_normal((rows, 2, 4)),
        shaped=np.array([False, True]),
        chosen=np.stack([np.zeros(rows, int), rng.integers(0, 4, rows)], 1),
    )


def build(root, shards=(0, 1, 2, 3), manifest=None):
    """Write and record the given shards; returns the manifest."""
    manifest = manifest or Manifest.create(str(root), PLAN, FP)
    for i in shards:
        info = write_shard(str(root), i, PLAN["num_shards"], [batch(i)], {"fingerprint": FP})
        counters = {"trajectories": info.rows, "candidates": 4 * info.rows, "teacher_s": 0.5}
        manifest.record_shard(info, counters, {"energy_gain": 0.1 * i})
    return manifest


def test_manifest_round_trip_and_totals(tmp_path):
    m = build(tmp_path, shards=(0, 2))
    assert m.committed() == [0, 2] and m.missing() == [1, 3]
    loaded = Manifest.load(str(tmp_path))
    assert loaded.to_dict() == m.to_dict()
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert data["schema_version"] == 1 and data["fingerprint"] == FP
    assert data["package_version"] == __version__
    assert data["plan"] == PLAN
    entry = data["shards"]["00002"]
    assert entry["path"] == "data/train-00002-of-00004.parquet"
    assert entry["rows"] == 5 and entry["bytes"] == os.path.getsize(tmp_path / entry["path"])
    assert entry["counters"] == {"trajectories": 5, "candidates": 20, "teacher_s": 0.5}
    assert entry["stats"] == {"energy_gain": 0.2}
    totals = {
        "shards": 2,
        "rows": 10,
        "bytes": data["shards"]["00000"]["bytes"] + entry["bytes"],
        "counters": {"candidates": 40, "teacher_s": 1.0, "trajectories": 10},
    }
    assert loaded.totals() == totals and data["totals"] == totals
    assert loaded.verify(0) and loaded.verify(2) and not loaded.verify(1)
    assert sorted(os.listdir(tmp_path)) == ["data", MANIFEST_FILE]  # no temp files left


def test_fingerprint_and_plan_refusal(tmp_path):
    m = build(tmp_path, shards=(0,))
    m.check_fingerprint(FP)
    message = (
        f"{tmp_path} holds a dataset with fingerprint {FP}, this config has fp-2222: "
        "use a new output folder or --overwrite"
    )
    with pytest.raises(ConfigError) as e:
        plan_status(str(tmp_path), PLAN, "fp-2222")
    assert str(e.value) == message
    with pytest.raises(ConfigError, match=r"planned with num_shards=4, this run asks for 8"):
        plan_status(str(tmp_path), {**PLAN, "num_shards": 8}, FP)
    with pytest.raises(ConfigError, match=r"plan\.rows_per_shard must be a positive int"):
        Manifest.create(str(tmp_path / "new"), {"num_shards": 2}, FP)


def test_plan_status_resumes_and_detects_corruption(tmp_path):
    assert plan_status(str(tmp_path), PLAN, FP) == ([0, 1, 2, 3], [], [])  # no manifest yet
    build(tmp_path, shards=(0, 1, 2))
    assert plan_status(str(tmp_path), PLAN, FP) == ([3], [0, 1, 2], [])

    m = Manifest.load(str(tmp_path))
    p0 = tmp_path / "data/train-00000-of-00004.parquet"
    data = bytearray(p0.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    p0.write_bytes(bytes(data))
    p1 = tmp_path / "data/train-00001-of-00004.parquet"
    p1.write_bytes(p1.read_bytes()[:-10])  # truncated
    assert not m.verify(0) and not m.verify(1) and m.verify(2)
    assert plan_status(str(tmp_path), PLAN, FP) == ([0, 1, 3], [2], [0, 1])

    (tmp_path / "data/train-00002-of-00004.parquet").unlink()  # deleted
    assert not m.verify(2)
    assert plan_status(str(tmp_path), PLAN, FP) == ([0, 1, 2, 3], [], [0, 1, 2])

    # rebuilding a shard gives the same bytes, so its record holds again
    build(tmp_path, shards=(0, 1, 2, 3), manifest=m)
    assert plan_status(str(tmp_path), PLAN, FP) == ([], [0, 1, 2, 3], [])
    m.forget(3)
    assert Manifest.load(str(tmp_path)).missing() == [3]


def test_unrecorded_shard_file_is_todo(tmp_path):
    build(tmp_path, shards=(0,))
    write_shard(str(tmp_path), 1, 4, [batch(1)], {})  # committed, but the driver died
    assert plan_status(str(tmp_path), PLAN, FP) == ([1, 2, 3], [0], [])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "the top level is not an object"),
        ('{"schema_version": 1, "plan": {}}', "'fingerprint' is missing or not a str"),
        (
            '{"schema_version": 1, "fingerprint": "x", "plan": {"num_shards": 2}, "shards": {}}',
            "plan.rows_per_shard must be a positive int",
        ),
        ('{"schema_version": 3, "fingerprint": "x", "plan": {}}', "schema v3"),
    ],
)
def test_load_rejects_malformed_manifest(tmp_path, content, message):
    (tmp_path / MANIFEST_FILE).write_text(content)
    with pytest.raises(DataError, match=message):
        Manifest.load(str(tmp_path))


def test_load_rejects_bad_shard_entries(tmp_path):
    m = build(tmp_path, shards=(0,))
    data = m.to_dict()
    data["shards"]["00000"]["sha256"] = "xyz"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(DataError, match="shard 00000 needs int rows and bytes and a hex sha256"):
        Manifest.load(str(tmp_path))
    data["shards"] = {"00009": m.to_dict()["shards"]["00000"]}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(DataError, match="shard key '00009' is not an index below 00004"):
        Manifest.load(str(tmp_path))
    with pytest.raises(DataError, match=r"has no manifest\.json"):
        Manifest.load(str(tmp_path / "elsewhere"))


def test_record_shard_checks_its_input(tmp_path):
    m = Manifest.create(str(tmp_path), PLAN, FP)
    info = write_shard(str(tmp_path), 1, 8, [batch(1)], {})  # a shard of another plan
    with pytest.raises(DataError, match="does not belong to this plan of 4 shards"):
        m.record_shard(info)
    info = write_shard(str(tmp_path), 1, 4, [batch(1)], {})
    with pytest.raises(DataError, match="counters of shard 1 must map names to finite numbers"):
        m.record_shard(info, {"trajectories": float("nan")})
    with pytest.raises(DataError, match="stats of shard 1 is not plain JSON"):
        m.record_shard(info, {}, {"gain": float("inf")})
    assert Manifest.load(str(tmp_path)).committed() == []


def test_failed_manifest_write_keeps_the_old_file(tmp_path, monkeypatch):
    """Disk full (ENOSPC) while the manifest is rewritten: one line, the old file intact."""
    import errno

    m = build(tmp_path, shards=(0,))
    before = (tmp_path / MANIFEST_FILE).read_bytes()
    info = write_shard(str(tmp_path), 1, 4, [batch(1)], {})

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(DataError) as e:
        m.record_shard(info)
    assert str(e.value) == (
        f"could not write manifest.json in {tmp_path} (No space left on device); free the "
        "space (or fix the permissions) and rerun the same command: the shards committed so "
        "far are kept"
    )
    assert (tmp_path / MANIFEST_FILE).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["data", MANIFEST_FILE]


def test_manifest_on_memory_filesystem():
    root = "memory://tsdfm-test-manifest/ds"
    fs = fsspec.filesystem("memory")
    try:
        build(root, shards=(1, 3))
        assert plan_status(root, PLAN, FP) == ([0, 2], [1, 3], [])
        path = "/tsdfm-test-manifest/ds/data/train-00003-of-00004.parquet"
        fs.pipe(path, fs.cat(path)[:-1])
        assert plan_status(root, PLAN, FP) == ([0, 2, 3], [1], [3])
        assert Manifest.load(root).totals()["rows"] == 10
    finally:
        fs.rm("/tsdfm-test-manifest", recursive=True)
