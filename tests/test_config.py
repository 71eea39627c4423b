"""The build config's fingerprint: pinned for existing datasets, changed by what changes bytes."""

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
    navigator = NavigatorConfig(4, 32, 3, 0.25, "softmax", 0.5, **nav)
    return BuildConfig("teacher", "compass", 3, 8, 8, navigator, 3, "fp32")


def _demo_cfg(k: int) -> BuildConfig:
    return BuildConfig("t", "c" if k > 1 else None, 2, 32, 32, NavigatorConfig(8, 1024, k), 0)


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


def test_teacher_temperature_changes_the_fingerprint_and_round_trips():
    tempered = _softmax_cfg(teacher_temperature=0.7)
    assert tempered.to_dict()["navigator"]["teacher_temperature"] == 0.7
    assert tempered.fingerprint(TEACHER, COMPASS) != _softmax_cfg().fingerprint(TEACHER, COMPASS)
    assert BuildConfig.from_dict(tempered.to_dict()) == tempered
    assert BuildConfig.from_dict(json.loads(json.dumps(tempered.to_dict()))) == tempered


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan")])
def test_bad_teacher_temperature(bad):
    with pytest.raises(ConfigError, match=r"teacher_temperature=.* must be a finite number > 0"):
        NavigatorConfig(teacher_temperature=bad)
