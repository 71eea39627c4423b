"""One confinement rule for paths read from files: inside their own folder, or one line."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tsdfm.models.data.trajectories import open_trajectory_dataset
from tsdfm.models.errors import PathError
from tsdfm.models.paths import confined, staged_dir
from tsdfm.models.train.distill import DistillConfig, prepare_run

SHARD1 = "data/train-00001-of-00003.parquet"


def test_confined_keeps_paths_inside_their_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.json").write_text("{}")
    assert confined(root, "a.json", "x") == (root / "a.json").resolve()
    assert confined(root, "sub/../b.json", "x") == (root / "b.json").resolve()
    (root / "inner.json").symlink_to(root / "sub")
    assert confined(root, "inner.json", "x") == (root / "sub").resolve()  # a link inside is fine
    (root / "link.json").symlink_to(tmp_path / "secret.json")
    cases = {
        "../../x.json": "with '..'",
        "sub/../../secret.json": "with '..'",
        str(tmp_path / "secret.json"): "the absolute path",
        "link.json": "through a symlink",
        "": "not a file name",
    }
    for relative, why in cases.items():
        with pytest.raises(PathError, match=why) as e:
            confined(root, relative, "config.json data.language")
        assert "\n" not in str(e.value) and str(e.value).startswith("config.json data.language")


def _teacher_with_language(tmp_path, saved_tiny_teacher, language: str):
    ckpt = shutil.copytree(saved_tiny_teacher, tmp_path / "ckpts" / "teacher")
    config = json.loads((ckpt / "config.json").read_text())
    config["data"]["language"] = language
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_checkpoint_data_file_outside_the_checkpoint_is_refused(
    tmp_path, tiny_blind_dataset, saved_tiny_teacher, how
):
    from tsdfm.pipeline.cli import app

    outside = tmp_path / "outside.json"
    shutil.copy(saved_tiny_teacher / "language.json", outside)
    language = {"dotdot": "../../outside.json", "absolute": str(outside)}.get(how, "lang.json")
    ckpt = _teacher_with_language(tmp_path, saved_tiny_teacher, language)
    if how == "symlink":
        (ckpt / "lang.json").symlink_to(outside)
    out = tmp_path / "runs" / "run"
    cfg = DistillConfig(data=str(tiny_blind_dataset), init=str(ckpt), out=str(out), device="cpu")
    with pytest.raises(PathError, match=r"config\.json data\.language of checkpoint"):
        prepare_run(cfg, warn=lambda msg: None)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpts",
        "outside.json",
    ]
    res = CliRunner().invoke(app, ["sample", "--model", str(ckpt), "-n", "2", "--steps", "4"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "config.json data.language" in lines[0], res.output


def _card_points_at(root, pattern: str) -> None:
    card = (root / "README.md").read_text()
    assert card.count("data/train-*.parquet") >= 1
    (root / "README.md").write_text(card.replace("path: data/train-*.parquet", f"path: {pattern}"))


@pytest.mark.parametrize("verify", [True, False])
def test_a_dataset_card_cannot_point_at_another_dataset(tmp_path, tiny_blind_dataset, verify):
    mine = shutil.copytree(tiny_blind_dataset, tmp_path / "mine")
    shutil.copytree(tiny_blind_dataset, tmp_path / "other")
    _card_points_at(mine, "../other/data/train-*.parquet")
    with pytest.raises(PathError, match=r"README\.md configs\[\]\.data_files.* with '\.\.'"):
        open_trajectory_dataset(mine, verify=verify)


def test_a_shard_symlinked_out_of_the_dataset_is_refused(tmp_path, tiny_blind_dataset):
    mine = shutil.copytree(tiny_blind_dataset, tmp_path / "mine")
    other = shutil.copytree(tiny_blind_dataset, tmp_path / "other")
    (mine / SHARD1).unlink()
    (mine / SHARD1).symlink_to(other / SHARD1)
    with pytest.raises(PathError, match=r"leads outside .* through a symlink"):
        open_trajectory_dataset(mine, verify=False)


@pytest.mark.parametrize("path", ["../other/" + SHARD1, "/etc/passwd"])
def test_a_manifest_shard_path_outside_the_dataset_is_refused(tmp_path, tiny_blind_dataset, path):
    mine = shutil.copytree(tiny_blind_dataset, tmp_path / "mine")
    manifest = json.loads((mine / "manifest.json").read_text())
    manifest["shards"]["00001"]["path"] = path
    (mine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PathError, match=r"manifest\.json shard 00001 path"):
        open_trajectory_dataset(mine)


def test_staged_dir_replaces_a_folder_whole_or_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "ckpt"
    with staged_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"

    with staged_dir(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]

    with pytest.raises(RuntimeError, match="interrupted"), staged_dir(target) as tmp:
        (tmp / "c.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or old folder left


def test_a_hub_snapshot_follows_links_into_its_own_blob_store_only(tmp_path):
    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_text("{}")
    (snap / "language.json").symlink_to("../../blobs/f00d")
    assert confined(snap, "language.json", "data.language") == (blobs / "f00d").resolve()
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    (snap / "leak.json").symlink_to(outside)
    with pytest.raises(PathError, match="through a symlink"):
        confined(snap, "leak.json", "data.language")
    with pytest.raises(PathError, match=r"with '\.\.'"):
        confined(snap, "../../blobs/f00d", "data.language")
