"""`publish` of checkpoints (teacher, student, compass) to a model repo through the fake Hub.

The student is a real `distill` run (3 steps on the tiny shaped dataset, with its final
evaluation); the card is read back through ``huggingface_hub.ModelCard`` and the published
checkpoint is loaded back at its tag through ``load_checkpoint("org/name@vN")`` and sampled
with ``tsdfm-pipeline sample --model org/name@vN``.
"""

import json
import shutil

import pytest
from fake_hub import FakeHub
from huggingface_hub import ModelCard, constants
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.pipeline.card import parse_model_card
from tsdfm.pipeline.cli import app
from tsdfm.pipeline.hub import (
    HubError,
    canonical_safetensors,
    from_pretrained,
    publish,
    push_to_hub,
)
from tsdfm.pipeline.manifest import Manifest

TOKEN = "hf_tsdfmTestSecretToken0123456789"
REPO = "tsdfm-org/tiny-student"
runner = CliRunner()


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    fake = FakeHub(constants.ENDPOINT, {TOKEN})
    fake.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield fake
    FakeHub.uninstall()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, tiny_shaped_dataset, saved_tiny_teacher):
    """A distill run folder: final/ (the student) and eval.json, as `distill` writes them."""
    out = tmp_path_factory.mktemp("distill") / "run"
    args = ["distill", "--data", str(tiny_shaped_dataset), "--teacher", str(saved_tiny_teacher)]
    args += ["--out", str(out), "--steps", "3", "--batch-size", "8", "--streams", "2"]
    args += ["--num-workers", "0", "--heldout-fraction", "0.2", "--eval-samples", "16"]
    res = runner.invoke(app, [*args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (out / "final" / "model.safetensors").is_file() and (out / "eval.json").is_file()
    return out


def _card(hub, repo=REPO, rev="v1") -> tuple[dict, str, str]:
    text = hub.files(repo, rev, "model")["README.md"].decode()
    meta, body = parse_model_card(text)
    return meta, body, text


def test_a_distill_run_publishes_to_a_model_repo_with_its_card(
    hub, run_folder, tiny_shaped_dataset, saved_tiny_teacher, tmp_path
):
    lines = []
    result = publish(run_folder, REPO, log=lines.append)
    assert (result.version, result.pull_request, result.repo_type) == ("v1", 1, "model")
    # distill records its local dataset and teacher paths in config.json (identity): said
    note = [line for line in lines if line.startswith("note: config.json records local paths")]
    assert len(note) == 1 and "provenance.dataset.id, provenance.init.spec" in note[0]
    assert REPO in hub.models and REPO not in hub.repos  # a model repo, not a dataset repo
    final = run_folder / "final"
    local = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    assert set(local) == {"config.json", "model.safetensors", "tokenizer.json", "language.json"}
    remote = hub.files(REPO, "v1", "model")
    assert set(remote) == {*local, "README.md", ".gitattributes"}
    assert all(remote[p] == data for p, data in local.items() if p != "model.safetensors")
    # the weights go up with their header in canonical order: the same tensors, and the same
    # bytes from one save to the next (safetensors itself orders __metadata__ at random)
    assert (
        remote["model.safetensors"]
        == canonical_safetensors(
            final / "model.safetensors", tmp_path / "canon.safetensors"
        ).read_bytes()
    )
    assert len(remote["model.safetensors"]) == len(local["model.safetensors"])
    repo = hub.models[REPO]
    assert repo.tags["v1"] == repo.branches["main"] and repo.prs[1]["status"] == "merged"
    # the weights are an LFS object; config.json + tokenizer + card come in the last commit
    assert hub.lfs and len(hub.calls("POST", r"^/api/models/.*/commit/refs/pr/1$")) == 2

    ckpt = load_checkpoint(final)
    manifest = Manifest.load(str(tiny_shaped_dataset))
    report = json.loads((run_folder / "eval.json").read_text())
    meta, body, text = _card(hub)
    t = meta["tsdfm"]
    assert (t["role"], t["identity"], t["trainer"]) == ("student", ckpt.identity, "distill")
    assert t["parameters"] == sum(p.numel() for p in ckpt.model.parameters())
    assert t["architecture"]["d_model"] == ckpt.config.backbone.d_model == 32
    assert t["architecture"]["step_conditioning"] is True
    assert t["student_steps"] == 4
    assert t["dataset"]["fingerprint"] == manifest.fingerprint
    assert t["dataset"]["id"] == tiny_shaped_dataset.name and t["dataset"]["local"] is True
    recorded = ckpt.config.provenance
    assert t["teacher_identity"] == recorded["teacher_identity"] is not None
    assert t["compass_identity"] == recorded["compass_identity"] is not None
    teacher = load_checkpoint(saved_tiny_teacher)
    assert t["init"] == {"name": "teacher", "identity": teacher.identity, "role": "teacher"}
    arm = report["arms"][0]
    assert t["evaluation"]["arms"][0]["gen_ppl"] == pytest.approx(arm["gen_ppl"])
    assert t["evaluation"]["true_perplexity"] == pytest.approx(report["true_perplexity"])
    assert meta["license"] == "unknown"  # the tiny teacher records none
    assert meta["library_name"] == "tsdfm" and "student" in meta["tags"]
    # model-index, as huggingface_hub reads it
    card = ModelCard(text)
    ppl = [r for r in card.data.eval_results if r.metric_type == "perplexity"]
    assert [round(r.metric_value, 4) for r in ppl] == [round(arm["gen_ppl"], 4)]
    assert card.data.model_name == REPO
    # the body: snippets pinned at the tag, the dataset's fingerprint, no local path
    assert f"tsdfm-pipeline sample --model {REPO}@v1 --steps 4" in body
    assert f'load_checkpoint("{REPO}@v1")' in body
    assert manifest.fingerprint in body and f"{arm['gen_ppl']:.4f}" in body
    assert str(tmp_path.parent) not in text and str(run_folder) not in text
    assert "/tmp" not in text and str(tiny_shaped_dataset) not in text


def test_republishing_the_same_checkpoint_is_a_no_op(hub, run_folder, tmp_path):
    first = publish(run_folder / "final", REPO)  # the checkpoint folder itself: same repo
    calls = len(hub.log)
    again = publish(run_folder, REPO)
    assert again.already_published and again.version == first.version == "v1"
    assert again.commit == first.commit
    assert not hub.calls("POST", r"/discussions$")[1:] and not hub.calls("POST", r"/tag/")[1:]
    writes = [(m, path) for m, path, _ in hub.log[calls:] if m != "GET"]
    assert writes == [("POST", "/api/repos/create")]  # exist_ok: the repo is there (409)
    # rebuilding: the same model saved again elsewhere has the same bytes, so no new version
    ckpt = load_checkpoint(run_folder / "final")
    rebuilt = tmp_path / "rebuilt"
    save_checkpoint(
        rebuilt, ckpt.model, ckpt.tokenizer, {"language.json": ckpt.data_file().read_bytes()}
    )
    assert publish(rebuilt, REPO).already_published
    assert set(hub.models[REPO].tags) == {"v1"} and len(hub.models[REPO].prs) == 1


def test_other_weights_are_the_next_version_and_v1_still_loads(hub, run_folder, tmp_path):
    import torch

    publish(run_folder, REPO)
    ckpt = load_checkpoint(run_folder / "final")
    with torch.no_grad():
        next(ckpt.model.parameters()).add_(0.5)
    changed = tmp_path / "changed"
    ident = save_checkpoint(
        changed, ckpt.model, ckpt.tokenizer, {"language.json": ckpt.data_file().read_bytes()}
    )
    second = publish(changed, REPO)
    assert (second.version, second.pull_request, second.already_published) == ("v2", 2, False)
    assert sorted(second.uploaded) == ["README.md", "model.safetensors"]  # the rest is on main
    assert load_checkpoint(f"{REPO}@v2").identity == ident
    assert load_checkpoint(f"{REPO}@v1").identity == load_checkpoint(run_folder / "final").identity


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_an_interrupted_checkpoint_upload_resumes_and_lost_answers_are_not_repeated(
    hub, run_folder
):
    sleeps = Sleeps()
    # the weights commit goes through; the last one (config, tokenizer, card) fails 6 times
    hub.fail("POST", r"^/api/models/.*/commit/refs/pr/1$", 500, times=6, after=1)
    with pytest.raises(HubError, match=r"still fails after 6 attempts .* rerun the same command"):
        publish(run_folder, REPO, sleep=sleeps)
    repo = hub.models[REPO]
    assert set(hub.files(REPO, "main", "model")) == {".gitattributes"}  # main never half
    assert repo.tags == {} and repo.prs[1]["status"] == "open"
    assert set(hub.files(REPO, "refs/pr/1", "model")) == {".gitattributes", "model.safetensors"}
    puts = len(hub.calls("PUT", r"^/lfs-upload/"))
    # the rerun: same PR, the weights are not sent again; a merge whose answer is lost after
    # it took effect is seen as done (checked before retrying), not repeated
    hub.fail("POST", r"/discussions/1/merge$", 502, performed=True)
    lines = []
    result = publish(run_folder, REPO, sleep=sleeps, log=lines.append)
    assert (result.version, result.pull_request) == ("v1", 1)
    rest = ["README.md", "config.json", "language.json", "tokenizer.json"]
    assert sorted(result.uploaded) == rest
    assert "resuming pull request #1" in lines and len(hub.calls("POST", r"/merge$")) == 1
    assert any("took effect before the error; not repeating it" in line for line in lines)
    assert len(hub.calls("PUT", r"^/lfs-upload/")) == puts == 1
    assert load_checkpoint(f"{REPO}@v1").identity == load_checkpoint(run_folder / "final").identity


def test_a_published_student_loads_at_its_tag(hub, run_folder):
    publish(run_folder, REPO)
    local = load_checkpoint(run_folder / "final")
    back = load_checkpoint(f"{REPO}@v1")
    assert back.identity == local.identity and back.config.role == "student"
    assert back.directory != local.directory  # read from the (fake) Hub's snapshot
    assert back.config.provenance == local.config.provenance
    assert from_pretrained(REPO, revision="v1").identity == local.identity
    assert from_pretrained(f"{REPO}@v1", role="student").identity == local.identity
    with pytest.raises(HubError, match="applies to a Hub repo id"):
        from_pretrained(run_folder / "final", revision="v1")


def test_a_published_student_samples_at_its_tag(hub, run_folder, tmp_path):
    publish(run_folder, REPO)
    res = runner.invoke(
        app,
        ["sample", "--model", f"{REPO}@v1", "-n", "3", "--out", str(tmp_path / "s.jsonl")],
    )
    assert res.exit_code == 0, res.output
    assert "3 samples, 4 steps" in res.output
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 3


@pytest.mark.parametrize("which", ["teacher", "compass"])
def test_teacher_and_compass_publish_with_their_role(
    hub, which, saved_tiny_teacher, saved_tiny_compass
):
    folder = {"teacher": saved_tiny_teacher, "compass": saved_tiny_compass}[which]
    repo = f"tsdfm-org/tiny-{which}"
    result = push_to_hub(folder, repo, license="mit")
    assert result.version == "v1" and repo in hub.models
    meta, body, _ = _card(hub, repo)
    ckpt = load_checkpoint(folder)
    assert (meta["tsdfm"]["role"], meta["tsdfm"]["identity"]) == (which, ckpt.identity)
    assert meta["license"] == "mit" and "evaluation" not in meta["tsdfm"]
    assert "model-index" not in meta
    if which == "compass":
        teacher = load_checkpoint(saved_tiny_teacher).identity
        assert meta["tsdfm"]["teacher_identity"] == teacher and teacher in body
        assert f"--compass {repo}@v1" in body
    else:
        assert f"sample --model {repo}@v1 -n 8" in body
    assert load_checkpoint(f"{repo}@v1").identity == ckpt.identity


def test_cli_publishes_a_checkpoint_and_prints_how_to_load_it(hub, run_folder):
    res = runner.invoke(app, ["publish", str(run_folder / "final"), "--repo", REPO])
    assert res.exit_code == 0, res.output
    assert f"published {REPO} v1" in res.output
    assert f'ckpt = load_checkpoint("{REPO}@v1")' in res.output
    assert f"tsdfm-pipeline sample --model {REPO}@v1" in res.output
    res = runner.invoke(app, ["publish", str(run_folder), "--repo", REPO, "--kind", "model"])
    assert res.exit_code == 0 and f"{REPO}: already published as v1" in res.output


def test_canonical_safetensors_is_the_same_bytes_for_the_same_tensors(tmp_path, saved_tiny_teacher):
    import struct

    from safetensors.torch import load_file

    ckpt = load_checkpoint(saved_tiny_teacher)
    copies = []
    for n in range(4):  # safetensors writes __metadata__ in a random order on each save
        save_checkpoint(tmp_path / f"save{n}", ckpt.model, ckpt.tokenizer)
        src = tmp_path / f"save{n}" / "model.safetensors"
        copies.append(canonical_safetensors(src, tmp_path / f"canon{n}.safetensors"))
    assert len({c.read_bytes() for c in copies}) == 1
    data = copies[0].read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert n % 8 == 0 and list(json.loads(data[8 : 8 + n])) == sorted(json.loads(data[8 : 8 + n]))
    original, canon = load_file(str(saved_tiny_teacher / "model.safetensors")), load_file(copies[0])
    assert original.keys() == canon.keys() and all(original[k].equal(canon[k]) for k in canon)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(HubError, match="is not a safetensors file"):
        canonical_safetensors(bad, tmp_path / "out.safetensors")


def _one_line_error(args) -> str:
    res = runner.invoke(app, ["publish", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    return res.output


def test_bad_input_is_one_line_and_nothing_is_sent(
    hub, tmp_path, run_folder, saved_tiny_teacher, tiny_shaped_dataset
):
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    out = _one_line_error([str(neither), "--repo", REPO])
    assert "neither a dataset folder (manifest.json) nor a checkpoint folder" in out
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(saved_tiny_teacher / "config.json", no_weights)
    assert "lacks model.safetensors" in _one_line_error([str(no_weights), "--repo", REPO])
    pickled = shutil.copytree(saved_tiny_teacher, tmp_path / "pickled")
    (pickled / "optimizer.pt").write_bytes(b"\x80\x04N.")
    assert "holds the pickle optimizer.pt" in _one_line_error([str(pickled), "--repo", REPO])
    out = _one_line_error([str(saved_tiny_teacher), "--repo", REPO, "--kind", "dataset"])
    assert "is a checkpoint folder, not a dataset" in out
    out = _one_line_error([str(tiny_shaped_dataset), "--repo", REPO, "--kind", "model"])
    assert "is a dataset folder, not a model" in out
    # an eval.json of another checkpoint is not put on this one's card
    stale = shutil.copytree(run_folder, tmp_path / "stale-run")
    report = json.loads((stale / "eval.json").read_text())
    report["model"]["identity"] = "sha256:" + "0" * 64
    (stale / "eval.json").write_text(json.dumps(report))
    assert "evaluates another checkpoint" in _one_line_error([str(stale), "--repo", REPO])
    assert not hub.calls("POST", r".") and not hub.models


def _logits(model, config):
    """The logits of ``model`` on three fixed random inputs (x_t, t, h = 1/4)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, config.input_vocab, (3, config.seq_len), generator=gen)
    t = torch.rand(3, generator=gen)
    with torch.no_grad():
        return model.eval()(x_t, t, torch.full((3,), 0.25))


def test_models_load_save_and_push_as_huggingface_hub_mixins(
    hub, run_folder, saved_tiny_compass, tmp_path
):
    """``hub_models.FlowModel.from_pretrained`` / ``save_pretrained`` / ``push_to_hub``
    (huggingface_hub's PyTorchModelHubMixin) read and write this project's checkpoint folders:
    the same files, the same identity, the same logits, on disk and at a Hub tag."""
    import torch

    from tsdfm.models import flow_model
    from tsdfm.models.errors import CheckpointError
    from tsdfm.pipeline.hub_models import CompassModel, FlowModel

    final = run_folder / "final"
    ckpt = load_checkpoint(final)
    model = FlowModel.from_pretrained(final)
    assert type(model) is FlowModel and not model.training
    assert isinstance(model, flow_model.FlowModel)  # usable wherever the plain class is
    assert torch.equal(_logits(model, ckpt.config), _logits(ckpt.model, ckpt.config))

    model.save_pretrained(tmp_path / "saved")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "saved").iterdir()}
    original = {p.name: p.read_bytes() for p in final.iterdir() if p.is_file()}
    assert set(saved) == {*original, "README.md"}  # + the mixin's card (not in the identity)
    assert all(
        saved[name] == data for name, data in original.items() if name != "model.safetensors"
    )
    assert load_checkpoint(tmp_path / "saved").identity == ckpt.identity

    result = model.push_to_hub(REPO)  # the project's flow: PR → merge → tag
    assert (result.version, result.repo_type) == ("v1", "model")
    back = FlowModel.from_pretrained(REPO, revision="v1")
    assert torch.equal(_logits(back, ckpt.config), _logits(ckpt.model, ckpt.config))
    assert load_checkpoint(f"{REPO}@v1").identity == ckpt.identity
    at = FlowModel.from_pretrained(f"{REPO}@v1")  # the project's org/name@rev form too
    assert torch.equal(_logits(at, ckpt.config), _logits(ckpt.model, ckpt.config))

    compass = CompassModel.from_pretrained(saved_tiny_compass)
    assert type(compass) is CompassModel
    with pytest.raises(
        CheckpointError, match="is a compass checkpoint, but a student or teacher is needed"
    ):
        FlowModel.from_pretrained(saved_tiny_compass)
    with pytest.raises(CheckpointError, match="applies to a Hub repo id"):
        FlowModel.from_pretrained(final, revision="v1")
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        FlowModel(ckpt.config).save_pretrained(tmp_path / "bare")
