"""The build config's fingerprint (pinned for existing datasets, changed by what changes bytes)
and the checkpoint identities it hashes, computed from the files without building a model."""

from __future__ import annotations

import hashlib
import json

import pytest

from tsdfm.models.errors import ConfigError
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.pipeline.config import BuildConfig

TEACHER = "sha256:" + "a" * 64
COMPASS = "sha256:" + "b" * 64
# the bundled teacher and compass, as recorded by the demo's datasets (docs/results/demo.md)
BUNDLED_TEACHER = "sha256:385e8e6d4dcee9f8969830f71af6541fde22b311be623f6c1ed9faf175823239"
BUNDLED_COMPASS = "sha256:94714c42d0ce53c2953d9e7a4e6479586f3e2aa4e5fe91c29ecf64f840429c07"


def _softmax_cfg(**nav) -> BuildConfig:
    """A schema-v1 config as published datasets recorded it (v1: no schema_version key)."""
    navigator = NavigatorConfig(4, 32, 3, 0.25, "softmax", 0.5, **nav)
    return BuildConfig("teacher", "compass", 3, 8, 8, navigator, 3, "fp32", schema_version=1)


def _demo_cfg(k: int) -> BuildConfig:
    compass = "c" if k > 1 else None
    return BuildConfig("t", compass, 2, 32, 32, NavigatorConfig(8, 1024, k), 0, schema_version=1)


def test_fingerprints_from_before_teacher_temperature_are_kept():
    """Computed before `teacher_temperature` existed: a default config keeps its dataset."""
    fp = "sha256:9e3410039ad0ae96dc19dd696dfd33613e8217b7a47811bb7785fab9d60d9c1a"
    assert _softmax_cfg().fingerprint(TEACHER, COMPASS) == fp
    assert _softmax_cfg(teacher_temperature=1.0).fingerprint(TEACHER, COMPASS) == fp
    assert _softmax_cfg(teacher_temperature=1).fingerprint(TEACHER, COMPASS) == fp
    # the demo's two datasets, whose fingerprints docs/results/demo.md shows
    assert _demo_cfg(1).fingerprint(BUNDLED_TEACHER, None).startswith("sha256:224f5d074f685c00")
    assert (
        _demo_cfg(8)
        .fingerprint(BUNDLED_TEACHER, BUNDLED_COMPASS)
        .startswith("sha256:077503bc147207de")
    )


def test_default_config_records_exactly_the_old_fields():
    """Shards hold ``to_dict()`` in their metadata, so its bytes must not change either."""
    old_nav = {
        "student_steps": 4,
        "teacher_steps": 32,
        "candidates": 3,
        "tau": 0.25,
        "selection": "softmax",
        "temperature": 0.5,
    }
    d = _softmax_cfg().to_dict()
    assert d["navigator"] == old_nav
    old_content = {
        "shards": 3,
        "trajectories_per_shard": 8,
        "batch_size": 8,
        "navigator": old_nav,
        "seed": 3,
        "precision": "fp32",
        "teacher_identity": TEACHER,
        "compass_identity": COMPASS,
    }
    blob = json.dumps(old_content, sort_keys=True, separators=(",", ":")).encode()
    assert (
        _softmax_cfg().fingerprint(TEACHER, COMPASS) == "sha256:" + hashlib.sha256(blob).hexdigest()
    )
    assert BuildConfig.from_dict(d) == _softmax_cfg()  # an old record loads at T = 1


def test_schema_version_is_recorded_from_v2_on_and_changes_the_fingerprint():
    v1 = _softmax_cfg()
    v2 = BuildConfig(**{**v1.__dict__, "schema_version": 2})
    assert BuildConfig("t", "c").schema_version == 2  # a build writes v2 by default
    assert "schema_version" not in v1.to_dict() and v2.to_dict()["schema_version"] == 2
    assert v2.fingerprint(TEACHER, COMPASS) != v1.fingerprint(TEACHER, COMPASS)
    assert BuildConfig.from_dict(v1.to_dict()) == v1  # a record without it is v1's
    assert BuildConfig.from_dict(v2.to_dict()) == v2
    texted = BuildConfig(**{**v2.__dict__, "text": True})
    assert texted.to_dict()["text"] is True and "text" not in v2.to_dict()
    assert texted.fingerprint(TEACHER, COMPASS) != v2.fingerprint(TEACHER, COMPASS)
    assert (v1.stores_text, v2.stores_text, texted.stores_text) == (True, False, True)
    for bad, what in ((3, "schema_version=3"), (True, "schema_version=True"), ("x", "text=")):
        field = "text" if what == "text=" else "schema_version"
        with pytest.raises(ConfigError, match=what):
            BuildConfig("t", "c", **{field: bad})


def test_teacher_temperature_changes_the_fingerprint_and_round_trips():
    tempered = _softmax_cfg(teacher_temperature=0.7)
    assert tempered.to_dict()["navigator"]["teacher_temperature"] == 0.7
    assert tempered.fingerprint(TEACHER, COMPASS) != _softmax_cfg().fingerprint(TEACHER, COMPASS)
    assert BuildConfig.from_dict(tempered.to_dict()) == tempered
    assert BuildConfig.from_dict(json.loads(json.dumps(tempered.to_dict()))) == tempered


def test_compile_is_recorded_when_on_and_changes_the_fingerprint():
    """Compiled kernels round differently, so a compiled build is another dataset."""
    plain = _softmax_cfg()
    compiled = BuildConfig(**{**plain.__dict__, "compile": True})
    assert "compile" not in plain.to_dict() and compiled.to_dict()["compile"] is True
    assert compiled.fingerprint(TEACHER, COMPASS) != plain.fingerprint(TEACHER, COMPASS)
    assert BuildConfig.from_dict(compiled.to_dict()) == compiled
    with pytest.raises(ConfigError, match="compile='yes' must be true or false"):
        BuildConfig("t", "c", compile="yes")


def test_max_memory_is_recorded_but_keeps_the_fingerprint():
    """The batch it picks does not change a shard's trajectories (tests/test_build_gpu_paths)."""
    plain = _softmax_cfg()
    budgeted = BuildConfig(**{**plain.__dict__, "max_memory": 1.5})
    assert "max_memory" not in plain.to_dict() and budgeted.to_dict()["max_memory"] == 1.5
    assert budgeted.fingerprint(TEACHER, COMPASS) == plain.fingerprint(TEACHER, COMPASS)
    assert BuildConfig.from_dict(budgeted.to_dict()) == budgeted
    for bad in (0, -1.0, True, "2"):
        with pytest.raises(ConfigError, match=r"max_memory=.* must be a positive number of GiB"):
            BuildConfig("t", "c", max_memory=bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan")])
def test_bad_teacher_temperature(bad):
    with pytest.raises(ConfigError, match=r"teacher_temperature=.* must be a finite number > 0"):
        NavigatorConfig(teacher_temperature=bad)


# identities from the files (tsdfm.models.identity): what the fingerprint hashes -------------


def test_identity_from_files_equals_the_loaded_checkpoints(saved_tiny_teacher, saved_tiny_compass):
    from tsdfm.models.checkpoint import bundled_path, load_checkpoint
    from tsdfm.models.errors import CheckpointError
    from tsdfm.models.identity import checkpoint_files, checkpoint_identity

    for d in (saved_tiny_teacher, saved_tiny_compass, bundled_path("teacher")):
        assert checkpoint_identity(d) == load_checkpoint(d).identity
    assert checkpoint_identity(bundled_path("teacher")) == BUNDLED_TEACHER
    assert checkpoint_identity(bundled_path("compass")) == BUNDLED_COMPASS
    files = checkpoint_files(saved_tiny_compass, role="compass")
    assert files.config.role == "compass" and files.directory == saved_tiny_compass
    with pytest.raises(CheckpointError, match="is a compass checkpoint, but a teacher is needed"):
        checkpoint_files(saved_tiny_compass, role="teacher")


def test_identity_from_files_covers_every_dtype_and_shape(tmp_path, saved_tiny_teacher):
    """Every dtype safetensors stores, scalars and empty tensors: the same digest as
    ``tsdfm.models.checkpoint.identity`` of the tensors themselves."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tsdfm.models.checkpoint import identity, read_config
    from tsdfm.models.identity import SAFETENSORS_DTYPES, weights_identity

    d = shutil.copytree(saved_tiny_teacher, tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    state = {}
    for code, (name, itemsize) in SAFETENSORS_DTYPES.items():
        dtype = getattr(torch, name.removeprefix("torch."))
        assert str(dtype) == name and dtype.itemsize == itemsize, code
        raw = torch.randint(0, 256, (3, 2 * itemsize), dtype=torch.uint8, generator=g)
        state[f"w.{code}"] = raw.view(dtype)  # (3, 2): every bit pattern is a valid tensor
    state["a.empty"] = torch.zeros(0, 4)
    state["b.scalar"] = torch.tensor(7, dtype=torch.uint8)
    save_file(state, str(d / "model.safetensors"), metadata={"note": "not hashed"})
    config = read_config(d).to_dict()
    assert weights_identity(config, d / "model.safetensors") == identity(
        config, load_file(str(d / "model.safetensors"))
    )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:5], "shorter than its 8-byte header length"),
        (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "header length 1000000000 exceeds"),
        (lambda raw: raw[:-4], "data offsets that do not fit its shape or the file"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "header is not JSON"),
    ],
)
def test_a_damaged_weights_file_is_refused_in_one_line(
    tmp_path, saved_tiny_teacher, damage, message
):
    import shutil

    from tsdfm.models.errors import CheckpointError
    from tsdfm.models.identity import checkpoint_identity

    d = shutil.copytree(saved_tiny_teacher, tmp_path / "ckpt")
    weights = d / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match="is not a readable safetensors file") as e:
        checkpoint_identity(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_hub_spec_is_resolved_as_load_checkpoint_resolves_it(saved_tiny_teacher, monkeypatch):
    from tsdfm.models import checkpoint
    from tsdfm.models.checkpoint import load_checkpoint
    from tsdfm.models.identity import checkpoint_files

    asked = []

    def download(repo_id, revision):
        asked.append((repo_id, revision))
        return saved_tiny_teacher

    monkeypatch.setattr(checkpoint, "_download", download)
    files = checkpoint_files("org/tiny-teacher@v1", role="teacher")
    assert asked == [("org/tiny-teacher", "v1")] and files.spec == "org/tiny-teacher@v1"
    assert files.identity == load_checkpoint(saved_tiny_teacher).identity


def test_the_driver_provenance_equals_the_builders(
    tmp_path, saved_tiny_teacher, saved_tiny_compass
):
    """identify(cfg) reads files only; a ShardBuilder loads the models: the same provenance."""
    from tsdfm.pipeline.worker import ShardBuilder, identify

    for compass, k in ((None, 1), (str(saved_tiny_compass), 3), ("exact", 3)):
        cfg = BuildConfig(str(saved_tiny_teacher), compass, navigator=NavigatorConfig(4, 32, k))
        assert identify(cfg) == ShardBuilder(cfg, str(tmp_path)).provenance
