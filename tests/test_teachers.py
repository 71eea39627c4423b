"""Teachers of other families behind the Denoiser protocol (tsdfm.models.teachers).

Tiny random-weight models of each family (tests/teacher_zoo.py) are saved as their libraries
save them and loaded back through the adapters: native masked LMs (BERT, RoBERTa,
ModernBERT) and remote-code families (MDLM-like, Duo-like) through transformers' dynamic
modules. Pickled state dicts are imported with `teacher import`.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import teacher_zoo as zoo
import torch
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.solver import sample
from tsdfm.models.teachers import open_teacher, teacher_files
from tsdfm.models.teachers.check import check_teacher
from tsdfm.models.teachers.vocab import NEVER, VocabMap
from tsdfm.pipeline.cli import app

runner = CliRunner()
NATIVE = ("bert", "roberta", "modernbert")
REMOTE = ("mdlm_like", "duo_like")


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """family name → a saved tiny teacher directory."""
    root = tmp_path_factory.mktemp("teachers")
    return {name: getattr(zoo, name)(root / name) for name in (*NATIVE, *REMOTE)}


def load(teachers, name):
    return open_teacher(teachers[name], trust_remote_code=name in REMOTE)


def test_vocab_map_moves_the_mask_to_v_and_back():
    vm = VocabMap(10, 3, never=(0, 9))
    assert vm.vocab_size == 9
    model_ids = torch.arange(10)
    internal = vm.to_internal(model_ids)
    assert internal.tolist() == [0, 1, 2, 9, 3, 4, 5, 6, 7, 8]  # mask 3 → V = 9, above shift
    assert torch.equal(vm.to_model(internal), model_ids)
    assert vm.never_internal() == [0, 8]
    logits = torch.arange(10, dtype=torch.float32).expand(2, 10)
    out = vm.logits(logits)
    assert out.shape == (2, 9)
    assert out[0, 1:8].tolist() == [1, 2, 4, 5, 6, 7, 8]  # column 3 (the mask) is gone
    p = torch.softmax(out.double(), -1)
    assert p[:, [0, 8]].max() == 0.0 and math.isclose(float(p[0].sum()), 1.0)
    assert torch.equal(VocabMap(5, None).to_internal(torch.arange(5)), torch.arange(5))
    with pytest.raises(CheckpointError, match="outside"):
        VocabMap(5, 5)


@pytest.mark.parametrize("name", [*NATIVE, *REMOTE])
def test_every_family_passes_teacher_check(teachers, name):
    ckpt = load(teachers, name)
    files = teacher_files(teachers[name], "teacher", trust_remote_code=name in REMOTE)
    assert files.identity == ckpt.identity  # the driver's identity, from files only
    assert files.config == ckpt.config
    report = check_teacher(ckpt, samples=2)
    assert report["step"]["max_sum_error"] < 1e-6
    assert report["step"]["never_drawn_max_probability"] == 0.0
    assert report["step"]["max_difference_from_network"] < 1e-6
    assert report["preflight"]["non_data_tokens_in_samples"] == 0
    assert report["k1"]["equal"]
    d = report["detected"]
    expected = {
        "bert": ("mask", 16, 7, True),
        "roberta": ("mask", 16, 16, True),
        "modernbert": ("mask", 18, 3, True),
        "mdlm_like": ("mask", 14, 14, True),
        "duo_like": ("uniform", 13, None, False),
    }[name]
    assert (d["source"], d["vocab_size"], d["mask_id"], d["time_invariant"]) == expected
    assert d["seq_len"] == zoo.SEQ_LEN  # RoBERTa: its 10 positions less the padding offset


def test_masked_lm_probabilities_are_the_networks_softmax(teachers):
    """BERT's [MASK] is id 7, inside the words: the adapter's p_1t at a masked position is
    the MLM head's softmax over the drawable tokens, in solver ids; revealed positions keep
    their token; [PAD] [UNK] [CLS] [SEP] are never drawn."""
    ckpt = load(teachers, "bert")
    V = ckpt.config.vocab_size
    x = torch.tensor([[V, 8, V, 5, V, V, V, V]])  # solver ids: 8 is model id 9 (above the mask)
    with torch.no_grad():
        p = torch.softmax(ckpt.model(x, torch.zeros(1), torch.zeros(1)).double(), -1)
        ids = torch.tensor([[7, 9, 7, 5, 7, 7, 7, 7]])
        raw = ckpt.model.network(input_ids=ids).logits[0].double()
    allowed = [j for j in range(raw.shape[-1]) if j not in (0, 1, 2, 3, 7)]
    ref = torch.softmax(raw[:, allowed], -1)
    solver_cols = [j if j < 7 else j - 1 for j in allowed]
    assert torch.allclose(p[0][:, solver_cols][[0, 2, 4]], ref[[0, 2, 4]], atol=1e-6)
    assert p[0, 1, 8] == 1.0 and p[0, 3, 5] == 1.0  # carried over
    assert p[0, :, [0, 1, 2, 3]].max() == 0.0  # specials (solver ids 0..3) never drawn


def _hf_tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def _data_model_ids(tok, model_vocab: int) -> list[int]:
    """Model ids a native masked LM may draw, from its tokenizer alone: every id the
    tokenizer has, less its special tokens (the mask among them)."""
    return [j for j in range(min(len(tok), model_vocab)) if j not in set(tok.all_special_ids)]


@pytest.mark.parametrize("name", NATIVE)
def test_teacher_check_cli_on_each_native_masked_lm(teachers, name, tmp_path):
    """`teacher check` on the saved folder: family masked-lm, the tokenizer's mask id, the
    vocabulary less the tokenizer's specials (and ModernBERT's rows past the tokenizer)."""
    d = teachers[name]
    tok = _hf_tokenizer(d)
    M = json.loads((d / "config.json").read_text())["vocab_size"]
    out = tmp_path / "check.json"
    res = runner.invoke(app, ["teacher", "check", str(d), "--samples", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert f"family: masked-lm (model_type {name})" in res.output
    assert "K=1 build equals the teacher sampler: yes" in res.output
    report = json.loads(out.read_text())
    det = report["detected"]
    data = _data_model_ids(tok, M)
    assert (det["family"], det["model_type"], det["model_vocab"]) == ("masked-lm", name, M)
    assert det["mask_id"] == tok.mask_token_id and det["mask_id"] not in data
    assert det["vocab_size"] == M - 1 == det["solver_mask_id"]  # every id but the mask
    assert det["vocab_size"] - det["never_drawn"] == len(data) == len(zoo.WORDS)
    assert (det["time_input"], det["time_invariant"], det["seq_len"]) == ("none", True, 8)
    assert not det["trust_remote_code"] and det["tokenizer"]
    assert report["step"]["max_sum_error"] < 1e-6
    assert report["step"]["never_drawn_max_probability"] == 0.0
    assert report["step"]["revealed_carried_min_probability"] == 1.0
    assert report["preflight"]["non_data_tokens_in_samples"] == 0
    assert report["k1"]["equal"]


@pytest.mark.parametrize("name", NATIVE)
def test_a_native_step_is_the_mlm_heads_softmax_over_data_tokens(teachers, name):
    """One denoising step against the library's own forward: transformers' model on the
    tokenizer's ids (its attention mask and its own position ids: RoBERTa's start past
    padding_idx, ModernBERT's rotary ones through a global and a sliding-window layer),
    softmaxed over the tokenizer's data tokens, is p_1t at every masked position; p_1t
    sums to 1, has no column for the mask and none of its mass on a special token, and a
    revealed position keeps its token."""
    from transformers import AutoModelForMaskedLM

    d = teachers[name]
    tok = _hf_tokenizer(d)
    ckpt = load(teachers, name)
    V = ckpt.config.vocab_size
    with torch.random.fork_rng(devices=[]):
        net = AutoModelForMaskedLM.from_pretrained(str(d)).eval()
    words = ["w3", "w0", "w11", "w5"]
    model_ids = torch.full((2, zoo.SEQ_LEN), tok.mask_token_id)
    model_ids[1, 1::2] = torch.tensor(tok.convert_tokens_to_ids(words))
    x = torch.full((2, zoo.SEQ_LEN), V)  # solver ids: the mask is V
    x[1, 1::2] = torch.tensor(ckpt.tokenizer.encode_ids(" ".join(words)))
    with torch.no_grad():
        p = torch.softmax(ckpt.model(x, torch.full((2,), 0.5)).double(), -1)
        raw = net(input_ids=model_ids, attention_mask=torch.ones_like(model_ids)).logits.double()
    data = _data_model_ids(tok, raw.shape[-1])
    cols = [ckpt.tokenizer.token_to_id(tok.convert_ids_to_tokens(j)) for j in data]
    assert p.shape == (2, zoo.SEQ_LEN, V) and len(set(cols)) == len(data)
    assert float((p.sum(-1) - 1).abs().max()) < 1e-12
    others = [i for i in range(V) if i not in set(cols)]
    assert p[..., others].max() == 0.0  # specials and rows past the tokenizer: never drawn
    masked = x == V
    ref = torch.softmax(raw[..., data], -1)
    assert torch.allclose(p[..., cols][masked], ref[masked], atol=1e-6)
    revealed = p[1, 1::2].gather(-1, x[1, 1::2, None]).squeeze(-1)
    assert revealed.tolist() == [1.0] * len(words)  # carried over
    if name == "roberta":  # the L = 8 positions are 2..9 of its 10 (pad id 1, then 1 + i)
        positions = torch.arange(zoo.SEQ_LEN) + net.config.pad_token_id + 1
        with torch.no_grad():
            explicit = net(input_ids=model_ids, position_ids=positions.expand(2, -1)).logits
        assert torch.allclose(explicit.double(), raw, atol=1e-6)
        assert int(positions[-1]) == net.config.max_position_embeddings - 1


@pytest.mark.parametrize("name", ["roberta", "modernbert"])  # BERT: tests/test_teacher_build.py
def test_a_native_k1_shard_equals_the_adapters_own_sampler(teachers, name, tmp_path):
    """A build worker's K = 1 shard (no Ray: the worker's own ShardBuilder) holds the final
    states of the adapter's N-step sampler for the same trajectory seeds."""
    import pyarrow.parquet as pq

    from tsdfm.models.data.schema import decode_rows
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.models.rng import trajectory_seed
    from tsdfm.pipeline.config import BuildConfig
    from tsdfm.pipeline.worker import ShardBuilder, identify

    rows, steps = 3, 8
    cfg = BuildConfig(
        str(teachers[name]),
        shards=1,
        trajectories_per_shard=rows,
        batch_size=rows,
        navigator=NavigatorConfig(2, steps, 1),
    )
    builder = ShardBuilder(cfg, str(tmp_path), planned=identify(cfg))
    assert builder.preflight["max_sum_error"] < 1e-6
    built = decode_rows(pq.read_table(tmp_path / builder.build(0).info.path))
    ckpt = load(teachers, name)
    ids = torch.arange(rows)
    seeds = trajectory_seed(0, ids)
    x_1 = sample(ckpt.model, ckpt.config.path(), seeds, ckpt.config.seq_len, steps).x_1
    assert torch.equal(torch.as_tensor(built.ids), ids)
    assert torch.equal(torch.as_tensor(built.states)[:, -1].long(), x_1)
    assert int(x_1.max()) < ckpt.config.vocab_size  # data tokens only, never the mask


def test_the_exact_cache_applies_to_time_invariant_adapters(teachers):
    """A time-invariant adapter is re-evaluated only for rows that changed: same samples,
    fewer forward passes, as for the project's own teacher."""
    ckpt = load(teachers, "mdlm_like")

    class Uncached:
        time_invariant = False

        def __call__(self, x, t, h):
            return ckpt.model(x, t, h)

    path, seeds = ckpt.config.path(), torch.arange(3)
    cached = sample(ckpt.model, path, seeds, zoo.SEQ_LEN, 32)
    plain = sample(Uncached(), path, seeds, zoo.SEQ_LEN, 32)
    assert torch.equal(cached.x_1, plain.x_1)
    assert plain.counters.row_forwards == 3 * 32
    assert cached.counters.row_forwards <= 3 * (zoo.SEQ_LEN + 1)


def test_duo_is_conditioned_on_sigma_of_kappa(teachers):
    """Duo's network gets σ = −log α with α = κ(t) (linear κ: σ = −log t, floored at 1e-3)."""
    ckpt = load(teachers, "duo_like")
    m = ckpt.model
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(
        m.sigma(t), torch.tensor([-math.log(1e-3), -math.log(0.25), 0.0]).double()
    )
    x = torch.randint(
        0, ckpt.config.vocab_size, (3, zoo.SEQ_LEN), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        out = m(x, t, t)
        ref = m.network(x, m.sigma(t).float()).logits
    assert torch.allclose(out[..., 1:], ref[..., 1:], atol=1e-6)  # id 0 ([UNK]) never drawn
    assert out[..., 0].max() == NEVER
    assert not torch.allclose(out[0], out[1])  # time matters


def test_remote_code_runs_only_on_request(teachers, tmp_path):
    d = teachers["mdlm_like"]
    with pytest.raises(CheckpointError, match="--trust-remote-code") as e:
        open_teacher(d)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        teacher_files(d, "teacher")  # the driver refuses too, before any worker
    res = runner.invoke(app, ["teacher", "check", str(d)])
    assert res.exit_code != 0 and "--trust-remote-code" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # the code's hash is part of the identity: edited code is another teacher
    edited = tmp_path / "edited"
    shutil.copytree(d, edited)
    code = edited / "modeling_mdlm.py"
    code.write_text(code.read_text() + "\n# edited\n")
    before = teacher_files(d, trust_remote_code=True)
    after = teacher_files(edited, trust_remote_code=True)
    assert before.identity != after.identity
    assert after.config.provenance["adapter"]["trust_remote_code"] is True
    # code that is not in the checkpoint never runs
    cfg = json.loads((edited / "config.json").read_text())
    cfg["auto_map"]["AutoModelForMaskedLM"] = "someone/else--modeling_mdlm.MDLM"
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        teacher_files(edited, trust_remote_code=True)


def test_sharded_safetensors_load_with_the_same_identity(teachers, tmp_path):
    sharded = zoo.roberta(tmp_path / "sharded", max_shard_size="4KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").exists()
    one, many = load(teachers, "roberta"), open_teacher(sharded)
    assert many.identity == one.identity  # the same tensors, however they are split
    x = torch.full((1, zoo.SEQ_LEN), one.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(one.model(x, torch.zeros(1)), many.model(x, torch.zeros(1)))
    (sharded / shards[0]).unlink()
    with pytest.raises(CheckpointError, match="lacks the shard"):
        teacher_files(sharded)


def test_family_detection_and_format_flag(teachers, tmp_path):
    d = tmp_path / "unknown"
    shutil.copytree(teachers["bert"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mystery", ["Mystery"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="--teacher-format"):
        teacher_files(d)
    with pytest.raises(CheckpointError, match="unknown teacher format"):
        teacher_files(d, teacher_format="gpt")
    cfg["model_type"] = "llada"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="LLaDA has no adapter"):
        teacher_files(d)


def test_teacher_check_cli_reports_and_writes_json(teachers, tmp_path):
    out = tmp_path / "check.json"
    res = runner.invoke(
        app,
        [
            "teacher",
            "check",
            str(teachers["duo_like"]),
            "--trust-remote-code",
            "--samples",
            "2",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "family: duo" in res.output and "K=1 build equals the teacher sampler: yes" in res.output
    report = json.loads(out.read_text())
    assert report["detected"]["source"] == "uniform" and report["detected"]["trust_remote_code"]
    assert report["detected"]["parameters"] == sum(
        p.numel() for p in load(teachers, "duo_like").model.parameters()
    )


# ---------------------------------------------------------------------------- teacher import
def _flow_model(seed=0, vocab=10, seq_len=8):
    torch.manual_seed(seed)
    model = FlowModel(teacher_config(vocab, seq_len, d_model=16, n_layers=2, n_heads=2)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_import_round_trips_a_pickled_flow_model(tmp_path):
    model = _flow_model()
    pth = tmp_path / "fsdfm_teacher.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 7}, pth)
    tok, _ = zoo.word_tokenizer(["[UNK]", "[MASK]"], zoo.WORDS[:9], mask_at=10)
    tok.save(str(tmp_path / "tokenizer.json"))
    args = [
        "teacher",
        "import",
        str(pth),
        "--out",
        str(tmp_path / "imported"),
        "--seq-len",
        "8",
        "--n-heads",
        "2",
        "--prefix",
        "module.",
        "--json",
        str(tmp_path / "r.json"),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and "--tokenizer" in res.output
    res = runner.invoke(app, [*args, "--tokenizer", str(tmp_path / "tokenizer.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    import hashlib

    assert report["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    ckpt = load_checkpoint(tmp_path / "imported", role="teacher")
    assert ckpt.config.provenance["source_sha256"] == report["source_sha256"]
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v)
    x = torch.tensor([[10, 3, 10, 10, 1, 10, 10, 10]])
    with torch.no_grad():
        assert torch.equal(ckpt.model(x, torch.zeros(1)), model(x, torch.zeros(1)))
    assert ckpt.config == model.config.replace(
        data={"kind": "imported"}, provenance=ckpt.config.provenance
    )


def test_import_sedd_layout_stores_the_tensors_and_build_refuses_it(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "vocab_embed.embedding": torch.randn(11, 8, generator=g),
        "sigma_map.mlp.0.weight": torch.randn(8, 256, generator=g),
        "blocks.0.attn_qkv.weight": torch.randn(24, 8, generator=g),
        "output_layer.linear.weight": torch.randn(11, 8, generator=g),
    }
    torch.save(state, tmp_path / "sedd.bin")
    res = runner.invoke(
        app,
        [
            "teacher",
            "import",
            str(tmp_path / "sedd.bin"),
            "--out",
            str(tmp_path / "s"),
            "--layout",
            "sedd",
            "--seq-len",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "s" / "model.safetensors"))
    assert stored.keys() == state.keys() and all(torch.equal(stored[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match=r"SEDD's DiT .* has no adapter yet"):
        teacher_files(tmp_path / "s", "teacher")


def test_pickles_are_refused_at_build_time_with_the_import_command(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    torch.save({"w": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="teacher import"):
        teacher_files(d)
    save_checkpoint(tmp_path / "own", _flow_model())
    (tmp_path / "own" / "model.safetensors").rename(tmp_path / "own" / "model.pth")
    with pytest.raises(CheckpointError, match="teacher import"):
        teacher_files(tmp_path / "own")


def test_import_refuses_objects_weights_only_cannot_load(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "opt": torch.optim.SGD}, bad)
    res = runner.invoke(app, ["teacher", "import", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "weights_only" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
