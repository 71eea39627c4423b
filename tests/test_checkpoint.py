import json

import pytest
import torch

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.flow_model import FlowModel


def _save(tmp_path, model, lang, name="ckpt"):
    d = tmp_path / name
    ident = save_checkpoint(
        d, model, lang.tokenizer(), {"language.json": json.dumps(lang.to_dict())}
    )
    return d, ident


def test_round_trip_gives_identical_logits_and_identity(tmp_path, tiny_teacher, tiny_language):
    for p in tiny_teacher.parameters():
        torch.nn.init.normal_(p, std=0.05)
    d, ident = _save(tmp_path, tiny_teacher, tiny_language)
    ck = load_checkpoint(d)
    assert ck.identity == ident and ident.startswith("sha256:")
    x = torch.randint(0, tiny_language.vocab_size + 1, (4, tiny_language.seq_len))
    t = torch.rand(4)
    assert torch.equal(ck.model(x, t), tiny_teacher(x, t))
    assert ck.tokenizer.token_to_id("[MASK]") == tiny_language.vocab_size
    # saving again gives the same identity; changing one weight changes it
    assert save_checkpoint(tmp_path / "again", ck.model, ck.tokenizer) == ident
    with torch.no_grad():
        next(ck.model.parameters()).view(-1)[0] += 1e-3
    assert save_checkpoint(tmp_path / "changed", ck.model, ck.tokenizer) != ident


def test_pickles_are_refused(tmp_path, tiny_teacher, tiny_language):
    pt = tmp_path / "teacher.pt"
    pt.write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(pt)
    d, _ = _save(tmp_path, tiny_teacher, tiny_language)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_checkpoint(d)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_files_are_named(tmp_path, tiny_teacher, tiny_language, missing):
    d, _ = _save(tmp_path, tiny_teacher, tiny_language)
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {missing}"):
        load_checkpoint(d)


def test_tokenizer_vocabulary_mismatch_is_refused(tmp_path, tiny_teacher, tiny_language):
    from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage

    other = SyntheticLanguage.generate(LanguageConfig(vocab_size=20, num_states=4, branching=3))
    d = tmp_path / "ckpt"
    save_checkpoint(d, tiny_teacher, other.tokenizer())
    with pytest.raises(CheckpointError, match=r"tokenizer vocabulary \(21 tokens\) does not match"):
        load_checkpoint(d)


def test_bad_specs_and_configs(tmp_path, tiny_teacher, tiny_language):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    d, _ = _save(tmp_path, tiny_teacher, tiny_language)
    with pytest.raises(CheckpointError, match="is a teacher checkpoint, but a compass is needed"):
        load_checkpoint(d, role="compass")
    cfg = json.loads((d / "config.json").read_text())
    cfg["source"] = "gaussian"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown source 'gaussian'"):
        load_checkpoint(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(d)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_teacher, tiny_language):
    d, _ = _save(tmp_path, tiny_teacher, tiny_language)
    cfg = json.loads((d / "config.json").read_text())
    cfg["backbone"]["n_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not fit its config\.json"):
        load_checkpoint(d)


def test_hub_revision_is_resolved_through_huggingface_hub(tmp_path, monkeypatch):
    """A repo id goes to the Hub client; offline, its error becomes a one-line message."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="org/teacher"):
        load_checkpoint("org/teacher@v1")


def test_flow_model_rejects_scalar_head(tiny_teacher):
    from dataclasses import replace

    cfg = tiny_teacher.config
    bad = replace(cfg, backbone=replace(cfg.backbone, head="scalar"))
    with pytest.raises(Exception, match="head='tokens'"):
        FlowModel(bad)
