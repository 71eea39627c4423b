"""The dataset card: YAML that `datasets` reads with the declared features; prose and numbers."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Features, load_dataset

from tsdfm.models.data.schema import trajectory_schema
from tsdfm.models.errors import DataError
from tsdfm.pipeline.card import (
    _flatten,
    card_facts,
    features_yaml,
    front_matter,
    parse_card,
    public_config,
    public_name,
    read_card,
    render_card,
    statistics,
    write_card,
)
from tsdfm.pipeline.manifest import Manifest


def _contract_features() -> Features:
    """The features of a default build: schema v2 without its optional text column."""
    return Features.from_arrow_schema(trajectory_schema(2, text=False))


def test_features_yaml_is_the_trajectory_schema():
    assert Features._from_yaml_list(features_yaml(2, False)) == _contract_features()
    for version, text in ((1, True), (2, True), (2, False)):
        names = [f["name"] for f in features_yaml(version, text)]
        assert names == trajectory_schema(version, text).names
    assert "text" not in trajectory_schema(2, text=False).names


def test_build_writes_a_card_whose_yaml_matches_the_data(tiny_shaped_dataset):
    root = tiny_shaped_dataset
    meta, _ = read_card(str(root))
    manifest = json.loads((root / "manifest.json").read_text())
    shards = sorted((root / "data").iterdir())
    info = meta["dataset_info"]
    uncompressed = sum(pq.ParquetFile(p).metadata.row_group(0).total_byte_size for p in shards)
    assert meta["configs"] == [
        {
            "config_name": "default",
            "data_files": [{"split": "train", "path": "data/train-*.parquet"}],
        }
    ]
    assert Features._from_yaml_list(info["features"]) == _contract_features()
    assert info["splits"] == [
        {
            "name": "train",
            "num_bytes": uncompressed,
            "num_examples": 24,
        }
    ]
    assert info["download_size"] == sum(p.stat().st_size for p in shards)
    assert info["download_size"] == manifest["totals"]["bytes"]
    assert info["dataset_size"] == info["splits"][0]["num_bytes"]
    # the tiny teacher records no license: the card says so rather than assuming one
    assert meta["license"] == "unknown" and "tsdfm" in meta["tags"]
    assert meta["pretty_name"] == "TS-DFM teacher trajectories (shaped, K=3, S=4, N=32)"
    assert meta["size_categories"] == ["n<1K"]
    t = meta["tsdfm"]
    shard_meta = json.loads(pq.ParquetFile(shards[0]).metadata.metadata[b"tsdfm"])
    assert t["fingerprint"] == manifest["fingerprint"] == shard_meta["fingerprint"]
    for key in ("teacher_identity", "compass_identity", "tokenizer_identity"):
        assert t[key] == shard_meta[key] and t[key].startswith("sha256:")
    assert t["model"] == {"vocab_size": 12, "seq_len": 8, "source": "mask", "mask_token_id": 12}
    assert t["num_shards"] == 3 and t["rows_per_shard"] == 8


def test_load_dataset_reads_the_folder_with_the_declared_features(tmp_path, tiny_shaped_dataset):
    root = shutil.copytree(tiny_shaped_dataset, tmp_path / "ds")
    declared = Features._from_yaml_list(read_card(str(root))[0]["dataset_info"]["features"])
    ds = load_dataset(str(root), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features == declared == _contract_features()
    assert ds.num_rows == 24
    assert sorted(ds["trajectory_id"]) == list(range(24))
    row = ds.sort("trajectory_id")[9]
    table = pq.read_table(root / "data" / "train-00001-of-00003.parquet")
    assert row == table.slice(1, 1).to_pylist()[0]
    assert len(row["times"]) == 5 and len(row["energies"][0]) == 3
    streamed = load_dataset(str(root), split="train", streaming=True)
    assert streamed.features == declared
    assert sum(1 for _ in streamed) == 24


def test_card_is_deterministic_and_keeps_its_build_date(tmp_path, tiny_blind_dataset):
    root = shutil.copytree(tiny_blind_dataset, tmp_path / "ds")
    built = (root / "README.md").read_text()
    assert write_card(str(root)) == built  # regenerating keeps the bytes (and the date)
    facts = card_facts(str(root))
    assert render_card(facts) == render_card(facts) == built
    old = write_card(str(root), build_date="2020-01-02")
    assert "| build date | 2020-01-02 |" in old
    assert write_card(str(root)) == old  # the recorded date sticks
    diff = [(a, b) for a, b in zip(built.splitlines(), old.splitlines(), strict=True) if a != b]
    assert all("build" in a and "build" in b for a, b in diff) and len(diff) == 2


def test_prose_has_provenance_statistics_schema_and_snippets(tiny_shaped_dataset):
    facts = card_facts(str(tiny_shaped_dataset))
    text = render_card(facts, repo_id="my-org/traj", version="v3")
    m = facts.manifest
    _, body = parse_card(text)
    for section in ("## How it was made", "## Use it", "## Statistics", "## Provenance"):
        assert section in body
    how = body.split("## How it was made")[1].split("## Use it")[0].strip()
    assert len([p for p in how.split("\n\n") if p.strip()]) == 2  # the algorithm, two paragraphs
    assert "K = 3 independent candidates" in how and "τ = 0.0" in how
    assert "tsdfm-pipeline distill --data my-org/traj@v3 --teacher TEACHER_CKPT --out DIR" in body
    assert 'load_dataset("my-org/traj", revision="v3", split="train", streaming=True)' in body
    for key, value in _flatten(public_config(m["plan"]["config"])):
        assert f"| config `{key}` | `{json.dumps(value)}` |" in body
    # the builder's local checkpoint paths are not published: only the folder names
    for key in ("teacher", "compass"):
        local = m["plan"]["config"][key]
        assert local not in text and f'| config `{key}` | `"{Path(local).name}"` |' in body
    assert "pypi.org" not in text  # no link to a package page
    for key in ("teacher_identity", "compass_identity", "tokenizer_identity"):
        assert f"`{facts.identities[key]}`" in body
    assert f"| fingerprint | `{m['fingerprint']}` |" in body
    assert f"| tsdfm-pipeline version | {m['package_version']} |" in body
    # energy gain: mean over shaped segments of (mean candidate − chosen), from the manifest
    entries = list(m["shards"].values())
    segs = sum(e["stats"]["shaped_segments"] for e in entries)
    gain = sum(e["stats"]["energy_gain"] * e["stats"]["shaped_segments"] for e in entries) / segs
    assert gain > 0  # argmin keeps a lower-than-average energy
    assert f"| mean energy gain (mean candidate − chosen) | {gain:.4f} |" in body
    ent = sum(e["stats"]["mean_final_unigram_entropy"] * e["rows"] for e in entries) / 24
    assert f"| mean unigram entropy of final sequences (nats) | {ent:.4f} |" in body
    assert f"| bytes (Parquet, zstd) | {m['totals']['bytes']:,} |" in body
    assert statistics(m)["rows"] == 24 and statistics(m)["shaped_segments"] == segs == 96
    for name in trajectory_schema(2, text=False).names:
        assert f"| `{name}` |" in body
    assert "| `tokens` | `list<int32>` |" in body and "| `text` |" not in body
    assert "| `energies` | `list<list<float16>>` |" in body


def test_distill_snippet_names_a_hub_teacher(tiny_blind_dataset):
    facts = card_facts(str(tiny_blind_dataset))
    facts.manifest["plan"]["config"]["teacher"] = "some-org/teacher@v2"
    text = render_card(facts, "a/b", "v1")
    assert "tsdfm-pipeline distill --data a/b@v1 --teacher some-org/teacher@v2 --out DIR" in text


def test_blind_card_says_blind(tiny_blind_dataset):
    text = (tiny_blind_dataset / "README.md").read_text()
    assert "blind baseline (K = 1)" in text
    assert "| mean energy gain (mean candidate − chosen) | – |" in text
    assert "ORG/NAME@vN" in text  # placeholders until published


def test_unfinished_dataset_has_no_card(tmp_path, tiny_blind_dataset):
    root = shutil.copytree(tiny_blind_dataset, tmp_path / "ds")
    Manifest.load(str(root)).forget(1)
    with pytest.raises(DataError, match=r"shards \[1\] are not committed"):
        write_card(str(root))


def test_card_without_front_matter_is_refused():
    with pytest.raises(DataError, match="no YAML front matter"):
        parse_card("# just a title\n")
    with pytest.raises(DataError, match="does not parse"):
        parse_card("---\na: [1, 2\n---\n")


def test_features_come_from_the_datasets_serializer():
    assert features_yaml(2, text=False) == _contract_features()._to_yaml_list()


def test_card_reads_back_through_huggingface_hub(tiny_shaped_dataset):
    from huggingface_hub import DatasetCard

    facts = card_facts(str(tiny_shaped_dataset))
    text = render_card(facts, "a/b", "v1")
    meta, body = parse_card(text)
    assert meta == DatasetCard(text).data.to_dict() == front_matter(facts)
    assert body.lstrip().startswith("# TS-DFM teacher trajectories")


def test_license_is_a_parameter_defaulting_to_the_teachers(tmp_path, tiny_blind_dataset):
    facts = card_facts(str(tiny_blind_dataset))
    assert facts.teacher_license is None and front_matter(facts)["license"] == "unknown"
    assert front_matter(facts, license="cc-by-4.0")["license"] == "cc-by-4.0"
    assert "license: mit" in render_card(facts, license="mit")
    # a teacher whose model card records a license passes it on
    teacher = shutil.copytree(facts.manifest["plan"]["config"]["teacher"], tmp_path / "t")
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n# a teacher\n")
    root = shutil.copytree(tiny_blind_dataset, tmp_path / "ds")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["plan"]["config"]["teacher"] = str(teacher)
    (root / "manifest.json").write_text(json.dumps(manifest))
    facts = card_facts(str(root))
    assert facts.teacher_license == "mit" and front_matter(facts)["license"] == "mit"
    assert front_matter(facts, license="other")["license"] == "other"  # the flag wins
    assert "license: mit" in write_card(str(root))


def test_checkpoints_are_named_by_hub_id_or_folder_name(tmp_path):
    assert public_name("some-org/teacher@v2") == "some-org/teacher@v2"
    assert public_name(str(tmp_path / "ckpts" / "teacher")) == "teacher"
    assert public_name(None) is None
    cfg = {"teacher": str(tmp_path / "t"), "compass": None, "seed": 3}
    assert public_config(cfg) == {"teacher": "t", "compass": None, "seed": 3}


# the model card ------------------------------------------------------------------------------


def test_model_card_is_a_pure_function_with_placeholders_and_a_license(saved_tiny_compass):
    from huggingface_hub import ModelCard

    from tsdfm.models.checkpoint import load_checkpoint
    from tsdfm.pipeline.card import model_card_facts, parse_model_card, render_model_card

    ckpt = load_checkpoint(saved_tiny_compass)
    facts = model_card_facts(ckpt)
    text = render_model_card(facts)
    assert text == render_model_card(model_card_facts(load_checkpoint(saved_tiny_compass)))
    assert "--compass ORG/NAME@vN" in text and 'load_checkpoint("ORG/NAME@vN")' in text
    meta, body = parse_model_card(text)
    assert meta["license"] == "unknown" and meta["tsdfm"]["role"] == "compass"
    assert meta["tsdfm"]["architecture"]["head"] == ckpt.config.backbone.head
    assert meta["tsdfm"]["teacher_identity"] == ckpt.config.provenance["teacher_identity"]
    assert ModelCard(render_model_card(facts, "o/c", "v3", "apache-2.0")).data.license == (
        "apache-2.0"
    )
    assert str(saved_tiny_compass) not in text and f"{facts.parameters:,} parameters" in body
    with pytest.raises(DataError, match="has no YAML front matter"):
        parse_model_card("# just a heading\n")


def test_eval_summary_refuses_a_report_of_another_model_or_no_report():
    from tsdfm.pipeline.card import eval_summary

    report = {
        "model": {"identity": "sha256:aa"},
        "evaluator": "synthetic",
        "true_perplexity": 3.5,
        "real_data": {"entropy_mean": 2.0},
        "arms": [
            {"name": "student 4 steps", "steps": 4, "samples": 16, "gen_ppl": 4.25},
        ],
    }
    with pytest.raises(DataError, match="is not an evaluation report"):
        eval_summary(report, "sha256:aa", "eval.json")  # entropy_mean missing
    report["arms"][0]["entropy_mean"] = 2.5
    got = eval_summary(report, "sha256:aa", "eval.json")
    assert got["arms"] == [
        {"name": "student 4 steps", "steps": 4, "samples": 16, "gen_ppl": 4.25, "entropy_mean": 2.5}
    ]
    assert (got["true_perplexity"], got["real_entropy_mean"]) == (3.5, 2.0)
    with pytest.raises(DataError, match="evaluates another checkpoint"):
        eval_summary(report, "sha256:bb", "eval.json")


def test_model_card_names_hub_dataset_and_teacher_in_its_metadata():
    from tsdfm.pipeline.card import ModelCardFacts, parse_model_card, render_model_card

    facts = ModelCardFacts(
        role="student",
        identity="sha256:" + "1" * 64,
        parameters=1234,
        architecture={
            "vocab_size": 8,
            "seq_len": 6,
            "source": "mask",
            "mask_token_id": 8,
            "scheduler": {"name": "polynomial", "n": 1.0},
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            "mlp_ratio": 4,
            "head": "tokens",
            "step_conditioning": True,
        },
        provenance={
            "trainer": "distill",
            "steps": 100,
            "student_steps": 4,
            "dataset": {"id": "my-org/traj-k8", "revision": "v2", "fingerprint": "sha256:ff"},
            "init": {"name": "my-org/teacher@v1", "identity": "sha256:ee", "role": "teacher"},
        },
    )
    meta, body = parse_model_card(render_model_card(facts, "my-org/student", "v1"))
    assert meta["datasets"] == ["my-org/traj-k8"] and meta["base_model"] == "my-org/teacher"
    assert "| dataset revision | v2 |" in body and "`my-org/teacher@v1` (teacher)" in body
    assert "sample --model my-org/student@v1 --steps 4 -n 8" in body
