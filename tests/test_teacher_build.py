"""`teacher check` → `build` → `verify` for a teacher of each adapter family (real Ray).

One teacher per family: this project's format, a native masked LM (BERT), an MDLM-like
remote-code SUBS teacher (time-invariant) and a Duo-like remote-code teacher (uniform
source, conditioned on σ). Each gets a tiny random compass that reads its solver states, so
the build shapes (K = 2); the datasets are checked for what the adapters promise (sources,
data tokens only, the remote code and its hash recorded) and replayed byte-exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pyarrow.parquet as pq
import pytest
import teacher_zoo as zoo
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tsdfm.models.data.schema import decode_rows
from tsdfm.models.errors import CheckpointError
from tsdfm.models.navigator import NavigatorConfig
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.solver import sample
from tsdfm.models.teachers import open_teacher, teacher_files
from tsdfm.pipeline.cli import app
from tsdfm.pipeline.config import BuildConfig
from tsdfm.pipeline.worker import ShardBuilder, identify

runner = CliRunner()
S, N = 2, 8  # student steps, teacher steps
SHARDS, ROWS = 2, 3
# --schema-version / --text: v1 with text (mdlm), v2 with the optional text column (masked-lm)
SCHEMA_FLAGS = {
    "tsdfm": [],
    "masked-lm": ["--text"],
    "mdlm": ["--schema-version", 1, "--text"],
    "duo": ["--no-text"],
}


@pytest.fixture(scope="module")
def zoo_teachers(tmp_path_factory, saved_tiny_teacher, saved_tiny_compass):
    """family → (teacher dir, compass dir, remote code)."""
    root = tmp_path_factory.mktemp("zoo")
    out = {"tsdfm": (saved_tiny_teacher, saved_tiny_compass, False)}
    for family, maker in (("masked-lm", "bert"), ("mdlm", "mdlm_like"), ("duo", "duo_like")):
        remote = family != "masked-lm"
        d = getattr(zoo, maker)(root / maker)
        out[family] = (d, zoo.compass_for(d, root / f"{maker}-compass", remote), remote)
    return out


def _build(teacher, out, *extra):
    args = [
        "build",
        "--teacher",
        teacher,
        "--out",
        out,
        "--shards",
        SHARDS,
        "--trajectories-per-shard",
        ROWS,
        "--batch-size",
        ROWS,
        "-S",
        S,
        "-N",
        N,
        "--device",
        "cpu",
        "--num-workers",
        1,
        *extra,
    ]
    return runner.invoke(app, [str(a) for a in args])


def _rows(out):
    files = sorted((out / "data").glob("train-*.parquet"))
    assert len(files) == SHARDS
    tables = [pq.read_table(f) for f in files]
    meta = [json.loads(pq.read_metadata(f).metadata[b"tsdfm"]) for f in files]
    return tables, meta


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("family", ["tsdfm", "masked-lm", "mdlm", "duo"])
def test_check_build_verify_each_family(zoo_teachers, tmp_path, family):
    teacher, compass, remote = zoo_teachers[family]
    trust = ["--trust-remote-code"] if remote else []
    report = tmp_path / "check.json"
    check = ["teacher", "check", str(teacher), "--samples", "2", "--steps", str(N)]
    res = runner.invoke(app, [*check, "--json", str(report), *trust])
    assert res.exit_code == 0, res.output
    checked = json.loads(report.read_text())
    assert checked["detected"]["family"] == family and checked["k1"]["equal"]
    assert checked["step"]["max_sum_error"] < 1e-6

    out = tmp_path / "ds"
    res = _build(teacher, out, "--compass", compass, "-K", 2, *trust, *SCHEMA_FLAGS[family])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("starting a local Ray cluster")  # no bar before the checks

    files = teacher_files(teacher, "teacher", trust_remote_code=remote)
    cfg = files.config
    manifest = json.loads((out / "manifest.json").read_text())
    version = 1 if family == "mdlm" else 2
    with_text = family in ("masked-lm", "mdlm")
    assert manifest["schema_version"] == version
    recorded_text = {"tsdfm": None, "masked-lm": True, "mdlm": True, "duo": False}[family]
    assert manifest["plan"]["config"].get("text") is recorded_text
    assert manifest["plan"]["config"].get("trust_remote_code", False) is remote
    record = manifest.get("teacher")
    if family == "tsdfm":
        assert record is None
    else:
        assert record["family"] == family and record["trust_remote_code"] is remote
        code = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in teacher.glob("*.py")}
        assert record["code"] == code and (len(code) == 2) is remote
        assert record["solver"] == {
            "vocab_size": cfg.vocab_size,
            "mask_token_id": cfg.mask_token_id,
            "seq_len": cfg.seq_len,
            "source": cfg.source,
        }

    tables, meta = _rows(out)
    assert {m["teacher_identity"] for m in meta} == {files.identity}
    assert {m["config"].get("trust_remote_code", False) for m in meta} == {remote}
    V = cfg.vocab_size
    never = set(record["never"]) if record else set()
    never_solver = set()
    if never:  # model ids → solver ids (the mask moves to V, ids above it down by one)
        m = record["mask_id"]
        never_solver = {j - (m is not None and j > m) for j in never}
    for table in tables:
        assert ("states" in table.schema.names) is (version == 1)  # v1 stores full states
        if version == 2:
            assert ("text" in table.schema.names) is with_text
        rows = decode_rows(table)
        states = torch.as_tensor(rows.states)  # (B, S+1, L)
        assert states.shape == (ROWS, S + 1, cfg.seq_len)
        final = states[:, -1]
        assert int(final.min()) >= 0 and int(final.max()) < V  # data tokens, never the mask
        assert not set(final.flatten().tolist()) & never_solver
        if cfg.source == "mask":
            assert bool((states[:, 0] == V).all())  # every trajectory starts all-[MASK]
        else:  # x_0 ~ U(V), special tokens included, as Duo's own uniform prior
            assert int(states[:, 0].min()) >= 0 and int(states[:, 0].max()) < V
        energies = torch.as_tensor(rows.energies)
        assert energies.shape == (ROWS, S, 2) and bool(torch.isfinite(energies).all())
        assert set(torch.as_tensor(rows.chosen).flatten().tolist()) <= {0, 1}
        if with_text:  # the teacher's own tokens, decoded by its own tokenizer
            assert all(isinstance(t, str) and len(t.split()) == cfg.seq_len for t in rows.text)
            assert all(w in zoo.WORDS for t in rows.text for w in t.split())

    res = runner.invoke(app, ["verify", str(out), "--replay", "1"])
    assert res.exit_code == 0, res.output
    assert "1 replayed" in res.output and "OK" in res.output
    assert "vocabulary unknown" not in res.output  # the card / manifest name the vocabulary
    card = (out / "README.md").read_text()
    assert f"vocab_size: {V}" in card


def test_replay_checks_the_recorded_teacher_before_its_code_runs(zoo_teachers, tmp_path):
    d = tmp_path / "mdlm"
    shutil.copytree(zoo_teachers["mdlm"][0], d)
    out = tmp_path / "ds"
    res = _build(d, out, "--trust-remote-code", "-K", 1)
    assert res.exit_code == 0, res.output
    with (d / "modeling_mdlm.py").open("a") as f:
        f.write('\nraise RuntimeError("this code must not run")\n')
    res = runner.invoke(app, ["verify", str(out), "--replay", "1"])
    assert res.exit_code != 0
    assert "cannot load the recorded checkpoints" in res.output, res.output
    assert "this code must not run" not in res.output


def _one_line_refusal(res, *needles):
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_build_refuses_remote_code_pickles_and_bad_flags(zoo_teachers, tmp_path):
    teacher, _, _ = zoo_teachers["mdlm"]
    out = tmp_path / "ds"
    _one_line_refusal(_build(teacher, out, "-K", 1), "--trust-remote-code", "modeling_mdlm.py")
    assert not out.exists()

    pickled = tmp_path / "pickled"
    shutil.copytree(zoo_teachers["masked-lm"][0], pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    _one_line_refusal(_build(pickled, out, "-K", 1), "pickled", "tsdfm-pipeline teacher import")
    assert not out.exists()

    bert = zoo_teachers["masked-lm"][0]
    _one_line_refusal(_build(bert, out, "-K", 1, "--teacher-format", "duo"), "auto_map")
    _one_line_refusal(_build(bert, out, "-K", 1, "--schema-version", 3), "--schema-version")
    _one_line_refusal(_build(bert, out, "-K", 1, "--teacher-format", "llada"), "--teacher-format")
    assert not out.exists()


def test_schema_text_and_format_in_the_config():
    blind = NavigatorConfig(S, N, 1)
    v1 = BuildConfig("t", navigator=blind, schema_version=1, text=False)
    assert v1.to_dict()["text"] is False and "schema_version" not in v1.to_dict()
    v2 = BuildConfig("t", navigator=blind)
    assert v2.to_dict()["schema_version"] == 2 and "text" not in v2.to_dict()
    assert not v2.stores_text and BuildConfig("t", navigator=blind, schema_version=1).stores_text
    assert v1.fingerprint("sha256:a", None) != v2.fingerprint("sha256:a", None)
    # an explicit --teacher-format names the family the identity already covers
    fmt = BuildConfig("t", navigator=blind, teacher_format="masked-lm", trust_remote_code=True)
    assert fmt.to_dict()["teacher_format"] == "masked-lm" and fmt.to_dict()["trust_remote_code"]
    assert fmt.fingerprint("sha256:a", None) == v2.fingerprint("sha256:a", None)


def _blind(teacher, remote, rows=1):
    return BuildConfig(
        str(teacher),
        shards=1,
        trajectories_per_shard=rows,
        batch_size=rows,
        navigator=NavigatorConfig(S, N, 1),
        trust_remote_code=remote,
    )


@pytest.mark.parametrize("family", ["masked-lm", "mdlm", "duo"])
def test_a_k1_shard_equals_the_adapters_own_sampler(zoo_teachers, tmp_path, family):
    teacher, _, remote = zoo_teachers[family]
    cfg = _blind(teacher, remote, rows=3)
    builder = ShardBuilder(cfg, str(tmp_path), planned=identify(cfg))
    info = builder.build(0).info
    rows = decode_rows(pq.read_table(tmp_path / info.path))
    ckpt = open_teacher(teacher, trust_remote_code=remote)
    ids = torch.arange(3)
    x_1 = sample(ckpt.model, ckpt.config.path(), trajectory_seed(0, ids), ckpt.config.seq_len, N)
    assert torch.equal(torch.as_tensor(rows.ids), ids)
    assert torch.equal(torch.as_tensor(rows.states)[:, -1].long(), x_1.x_1)


def test_a_worker_checks_the_files_before_running_remote_code(zoo_teachers, tmp_path):
    d = tmp_path / "mdlm"
    shutil.copytree(zoo_teachers["mdlm"][0], d)
    cfg = _blind(d, True)
    planned = identify(cfg)
    builder = ShardBuilder(cfg, str(tmp_path / "out"), planned=planned)
    assert builder.provenance == planned
    assert builder.preflight["max_sum_error"] < 1e-6  # the step check ran on this worker
    assert builder.preflight["revealed_carried_min_probability"] == 1.0
    # the code changes on this node after the driver hashed it: refused before it is imported
    with (d / "modeling_mdlm.py").open("a") as f:
        f.write('\nraise RuntimeError("this code must not run")\n')
    with pytest.raises(CheckpointError, match="every node must see the same teacher files"):
        ShardBuilder(cfg, str(tmp_path / "out"), planned=planned)


def test_a_teacher_failing_the_step_check_builds_no_shard(zoo_teachers, tmp_path):
    d = tmp_path / "bert"
    shutil.copytree(zoo_teachers["masked-lm"][0], d)
    state = load_file(str(d / "model.safetensors"))
    bias = next(k for k in sorted(state) if k.endswith(".bias"))
    state[bias] = torch.full_like(state[bias], float("nan"))
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = _blind(d, False)
    identify(cfg)  # the files are fine; only the network shows the fault
    with pytest.raises(CheckpointError, match=r"the denoising step fails .*not finite"):
        ShardBuilder(cfg, str(tmp_path / "out"), planned=identify(cfg))
    assert not (tmp_path / "out").exists()
