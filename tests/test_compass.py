"""The compass model, the scorer interface (compass and causal LM), compatibility checks and
the measurement library."""

import json
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.compass import (
    CausalLMScorer,
    CompassModel,
    CompassScorer,
    TeacherMismatchWarning,
    check_compatible,
    check_teacher_identity,
    compass_config,
    load_compass,
)
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.eval.compass_metrics import (
    CompassEvalConfig,
    energy_auc,
    evaluate_scorer,
    rank,
    roc_auc,
    selection_gain,
    spearman,
    stratified_auc,
)
from tsdfm.models.flow_model import FlowModel, teacher_config
from tsdfm.models.scorer import Scorer
from tsdfm.models.train.common import seeded

DATA = {"kind": "synthetic", "language": "language.json"}


def _teacher(lang, seed=0, **kw):
    cfg = teacher_config(
        lang.vocab_size, lang.seq_len, d_model=32, n_layers=2, n_heads=2, data=DATA, **kw
    )
    with seeded(seed):
        return FlowModel(cfg).eval()


def _compass(teacher_cfg, seed=1):
    with seeded(seed):
        model = CompassModel(compass_config(teacher_cfg, d_model=16, n_layers=2, n_heads=2))
        # zero-initialised gates make a fresh compass blind to t; give every weight a value
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def _save_teacher(path, teacher, lang):
    save_checkpoint(path, teacher, lang.tokenizer(), {"language.json": json.dumps(lang.to_dict())})
    return load_checkpoint(path, role="teacher")


def _states(lang, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = lang.sample(n, gen)
    masked = torch.rand(x.shape, generator=gen) < 0.4
    return torch.where(masked, torch.full_like(x, lang.vocab_size), x)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_language):
    """A tiny random GPT-2 with a character-level tokenizer over the language's words."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    chars = sorted(set("".join(tiny_language.words)) | {" "})
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
    )
    with seeded(0):
        lm = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(vocab),
                n_positions=64,
                n_embd=16,
                n_layer=1,
                n_head=2,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    d = tmp_path_factory.mktemp("lm")
    lm.save_pretrained(d)
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory, tiny_language):
    return _save_teacher(
        tmp_path_factory.mktemp("t") / "teacher", _teacher(tiny_language), tiny_language
    )


def test_energies_are_finite_time_dependent_and_batch_order_invariant(tiny_language):
    compass = _compass(_teacher(tiny_language).config)
    x = _states(tiny_language, 16)
    t = torch.linspace(0.05, 1.0, 16)
    e = compass(x, t)
    assert e.shape == (16,) and e.dtype == torch.float32 and torch.isfinite(e).all()
    assert e.std() > 1e-3  # different sequences, different energies
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(compass(x[perm], t[perm]), e[perm], rtol=1e-5, atol=1e-6)
    # a row's energy does not depend on its batch-mates
    torch.testing.assert_close(compass(x[3:4], t[3:4]), e[3:4], rtol=1e-5, atol=1e-6)
    # time conditioning is live, and a float t equals a constant tensor
    assert not torch.allclose(compass(x, 0.1), compass(x, 0.9))
    torch.testing.assert_close(compass(x, 0.5), compass(x, torch.full((16,), 0.5)))


def test_compass_config_follows_the_teacher_and_bad_configs_are_refused(tiny_language):
    tcfg = _teacher(tiny_language, source="uniform").config
    cfg = compass_config(tcfg, d_model=16, n_layers=1, n_heads=2)
    assert cfg.role == "compass" and cfg.backbone.head == "scalar"
    assert cfg.backbone.time_conditioning and not cfg.backbone.step_conditioning
    for key in ("vocab_size", "special_tokens", "source", "scheduler", "seq_len", "data"):
        assert getattr(cfg, key) == getattr(tcfg, key), key
    assert cfg.backbone.vocab_in == tcfg.input_vocab
    with pytest.raises(ConfigError, match="role='compass'"):
        CompassModel(tcfg)
    from dataclasses import replace

    with pytest.raises(ConfigError, match="head='scalar' or 'tokens' and time_conditioning"):
        CompassModel(replace(cfg, backbone=replace(cfg.backbone, time_conditioning=False)))
    with pytest.raises(ConfigError, match="needs the mask source and provenance reveal_order"):
        CompassModel(replace(cfg, backbone=replace(cfg.backbone, head="tokens")))


def test_a_compass_checkpoint_loads_in_a_process_that_never_imported_the_compass_module(
    tmp_path, tiny_language
):
    tcfg = _teacher(tiny_language).config
    compass = _compass(tcfg)
    compass.config = compass.config.replace(provenance={"teacher_identity": "sha256:abc"})
    ident = save_checkpoint(tmp_path / "c", compass, tiny_language.tokenizer())
    x = _states(tiny_language)
    torch.save({"x": x, "e": compass(x, 0.3)}, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        from tsdfm.models.checkpoint import load_checkpoint
        ck = load_checkpoint({str(tmp_path / "c")!r}, role="compass")
        assert "tsdfm.models.compass" not in sys.modules, "the loader imported the compass"
        want = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(ck.model(want["x"], 0.3), want["e"], rtol=0, atol=0)
        print(type(ck.model).__name__, ck.identity)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CompassModel", ident]
    scorer = load_compass(tmp_path / "c")
    assert scorer.identity == ident and scorer.teacher_identity == "sha256:abc"
    assert scorer.name == "compass"


@pytest.mark.parametrize("kind", ["compass", "causal-lm"])
def test_scorer_contract(kind, tiny_language, saved_teacher, lm_dir):
    if kind == "compass":
        scorer = CompassScorer(_compass(saved_teacher.config), "sha256:test")
    else:
        scorer = CausalLMScorer.from_pretrained(lm_dir, saved_teacher)
    assert isinstance(scorer, Scorer) and scorer.identity.startswith("sha256:")
    x = _states(tiny_language, 10)
    t = torch.linspace(0.1, 0.9, 10)
    e = scorer.energy(x, t)
    assert e.shape == (10,) and e.dtype == torch.float32 and e.device == x.device
    assert torch.isfinite(e).all() and e.std() > 0
    assert torch.equal(scorer.energy(x, t), e)  # deterministic
    perm = torch.arange(9, -1, -1)
    torch.testing.assert_close(scorer.energy(x[perm], t[perm]), e[perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer.energy(x[4:5], t[4:5]), e[4:5], rtol=1e-5, atol=1e-5)


def test_causal_lm_energy_is_the_mean_token_nll_of_the_denoised_guess(
    tiny_language, saved_teacher, lm_dir
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = CausalLMScorer.from_pretrained(lm_dir, saved_teacher)
    x = _states(tiny_language, 4, seed=2)
    guess = scorer.denoise(x, 0.5)
    mask = x == tiny_language.vocab_size
    assert mask.any() and (guess < tiny_language.vocab_size).all()
    assert torch.equal(guess[~mask], x[~mask])  # revealed tokens are kept
    argmax = saved_teacher.model(x, torch.full((4,), 0.5)).argmax(-1)
    assert torch.equal(guess[mask], argmax[mask])
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(lm_dir)
    e = scorer.energy(x, 0.5)
    for b in range(4):  # the reference, one sequence at a time
        text = tiny_language.decode(guess[b])
        ids = torch.tensor([[0, *tok(text, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, :-1], -1)
        nll = -logp.gather(1, ids[0, 1:, None]).mean()
        assert e[b].item() == pytest.approx(nll.item(), rel=1e-4)
    assert len({len(tiny_language.decode(g)) for g in guess}) > 1  # padding was exercised


def test_causal_lm_scorer_refuses_bad_inputs(tmp_path, saved_teacher, lm_dir):
    with pytest.raises(CheckpointError, match=r"lacks config\.json"):
        CausalLMScorer.from_pretrained(tmp_path / "nowhere", saved_teacher)
    with pytest.raises(CheckpointError, match="pickle"):
        CausalLMScorer.from_pretrained(tmp_path / "lm.bin", saved_teacher)
    (tmp_path / "nolm").mkdir()
    (tmp_path / "nolm" / "config.json").write_text((lm_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="could not load the causal LM"):
        CausalLMScorer.from_pretrained(tmp_path / "nolm", saved_teacher)


def test_incompatible_compass_is_refused_naming_both(tiny_language):
    from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage

    tcfg = _teacher(tiny_language).config
    check_compatible(compass_config(tcfg), tcfg, "c", "t")  # a compass for this teacher fits
    other = SyntheticLanguage.generate(
        LanguageConfig(vocab_size=20, num_states=4, branching=3, seq_len=8)
    )
    wide = compass_config(_teacher(other).config)
    with pytest.raises(
        CheckpointError, match=r"compass runs/c does not fit teacher runs/t \(vocabulary 20 vs 12"
    ):
        check_compatible(wide, tcfg, "runs/c", "runs/t")
    uniform = compass_config(_teacher(tiny_language, source="uniform").config)
    with pytest.raises(CheckpointError, match=r"special tokens \{\} vs \{'mask': 12\}.*source"):
        check_compatible(uniform, tcfg, "c", "t")


def test_teacher_identity_mismatch_is_refused_or_warned():
    check_teacher_identity("sha256:aa", "sha256:aa", "compass c", "t")
    with pytest.raises(
        CheckpointError, match=r"compass c was built from teacher sha256:bb.*--allow"
    ):
        check_teacher_identity("sha256:bb", "sha256:aa", "compass c", "t")
    with pytest.raises(CheckpointError, match="an unknown teacher"):
        check_teacher_identity(None, "sha256:aa", "compass c", "t")
    with pytest.warns(TeacherMismatchWarning, match="continuing as allowed"):
        check_teacher_identity("sha256:bb", "sha256:aa", "compass c", "t", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_teacher_identity("sha256:aa", "sha256:aa", "compass c", "t", True)


def test_rank_auc_and_spearman_numbers():
    assert torch.equal(
        rank(torch.tensor([3.0, 1.0, 3.0, 2.0])), torch.tensor([3.5, 1, 3.5, 2]).double()
    )
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert roc_auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    # pairs (pos, neg): (1,1) tie, (1,0) win, (0,1) loss, (0,0) tie → (1 + 0.5 + 0.5) / 4
    assert roc_auc(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])) == 0.5
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([1.0])) == 0.75
    assert energy_auc(torch.tensor([-1.0, -2.0]), torch.tensor([0.5, 3.0])) == 1.0
    # a t-dependent offset blurs the pooled AUC, not the AUC within bins of t
    t = torch.tensor([0.1, 0.4, 0.6, 0.9]).repeat_interleave(16)
    u = torch.rand(64, generator=torch.Generator().manual_seed(1)) / 2
    e_real, e_teacher = 10 * t + u, 10 * t + u + 1  # at every t, real beats teacher
    assert energy_auc(e_real, e_teacher) < 0.7
    assert stratified_auc(e_real, e_teacher, t, t, bins=8) == 1.0
    a = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert spearman(a, -(a**3)) == pytest.approx(-1.0)
    assert math.isnan(spearman(a, torch.ones(50)))


class ConstantScorer:
    name = "constant"
    identity = "sha256:constant"

    def energy(self, x_t, t):
        return torch.zeros(x_t.shape[0], device=x_t.device)


def test_selection_with_a_constant_scorer_is_the_blind_trajectory(tiny_language, saved_teacher):
    """argmin over equal energies keeps lane 0, which is the blind continuation: gain is 0."""
    cfg = CompassEvalConfig(
        samples=24, teacher_steps=32, candidates=4, midpoints=(2, 5), batch_size=10
    )
    rows = selection_gain(ConstantScorer(), saved_teacher, tiny_language, cfg, 0, "cpu")
    assert [r["k"] for r in rows] == [2, 5]
    for r in rows:
        assert r["gain"] == 0.0 and r["share_not_lane0"] == 0.0
        assert r["nll_blind"] == r["nll_selected"] > 0


def test_selection_by_exact_likelihood_of_the_denoised_guess_helps(tiny_language, saved_teacher):
    """A scorer that knows the truth must not lose: the selection machinery works."""

    class Oracle:
        name = "oracle"
        identity = "sha256:oracle"

        def energy(self, x_t, t):
            guess = CausalLMScorer.denoise(self, x_t, t)
            return -tiny_language.log_likelihood(guess).float()

    oracle = Oracle()
    oracle.teacher = saved_teacher.model
    cfg = CompassEvalConfig(
        samples=48, teacher_steps=32, candidates=6, midpoints=(4,), batch_size=48
    )
    (row,) = selection_gain(oracle, saved_teacher, tiny_language, cfg, 0, "cpu")
    assert row["gain"] > 0.5 and row["energy_chosen"] < row["energy_lane0"]
    assert 0 < row["share_not_lane0"] < 1


def test_evaluate_scorer_report(tiny_language, saved_teacher):
    cfg = CompassEvalConfig(
        times=(0.5, 1.0), samples=32, seeds=2, teacher_steps=16, candidates=3, midpoints=(4,)
    )
    scorer = CompassScorer(_compass(saved_teacher.config), "sha256:c")
    report = evaluate_scorer(scorer, saved_teacher, cfg)
    assert report["auc"]["times"] == [0.5, 1.0]
    assert len(report["auc"]["per_seed"]) == 2
    assert all(0.0 <= a <= 1.0 for a in report["auc"]["mean"])
    assert -1 <= report["spearman"]["teacher_samples"]["mean"] <= 1
    (mp,) = report["selection"]["midpoints"]
    assert mp["t_k"] == 0.5 and len(mp["gain"]["per_seed"]) == 2
    assert report["selection"]["gain"]["mean"] == pytest.approx(mp["gain"]["mean"])
    json.dumps(report)  # JSON-able


def test_the_compass_metrics_score_the_samples_eval_draws(tiny_language, saved_teacher):
    from tsdfm.models.data.sources import default_data_source
    from tsdfm.models.eval.compass_metrics import separation
    from tsdfm.models.eval.sampling import draw
    from tsdfm.models.rng import trajectory_seed

    cfg = CompassEvalConfig(times=(0.5, 1.0), samples=10, teacher_steps=16, batch_size=4)
    scorer = CompassScorer(_compass(saved_teacher.config), "sha256:c")
    data = default_data_source(saved_teacher)
    _, final, e_final = separation(scorer, saved_teacher, data, cfg, 2, "cpu")
    drawn = draw(saved_teacher, trajectory_seed(2, torch.arange(10)), 16, batch_size=3)
    assert torch.equal(final.cpu(), drawn.tokens)  # the N-step samples `eval` scores
    torch.testing.assert_close(e_final, scorer.energy(drawn.tokens, 1.0))


def _token_compass(tiny_language, S=4):
    tcfg = _teacher(tiny_language).config
    prov = {"reveal_order": "dilated", "student_steps": S}
    with seeded(3):
        return CompassModel(
            compass_config(tcfg, d_model=16, n_layers=1, n_heads=2, provenance=prov, head="tokens")
        ).eval()


def test_token_compass_energy_is_minus_the_log_ratios_of_the_last_segment(tiny_language):
    """E(x_{t_{k+1}}) = −Σ_{i in segment k} r(X)[i, x^i], X = x with segment k masked again;
    siblings (same X) differ only through their segment-k tokens."""
    from tsdfm.models.solver import RevealPlan

    S = 4
    compass = _token_compass(tiny_language, S)
    torch.nn.init.normal_(compass.backbone.out.weight, std=0.5)  # r ≠ 0 everywhere
    cfg = compass.config
    path, mask, V = cfg.path(), cfg.mask_token_id, cfg.vocab_size
    seg = RevealPlan("dilated", S).segment_of(path, cfg.seq_len)
    gen = torch.Generator().manual_seed(0)
    x_1 = tiny_language.sample(6, gen)
    for k in range(S):
        x = torch.where(seg <= k, x_1, torch.full_like(x_1, mask))  # states at t_{k+1}
        prev = torch.where(seg == k, torch.full_like(x, mask), x)
        with torch.no_grad():
            r = compass.log_ratios(prev, k / S)
            e = compass(x, (k + 1) / S)
        want = -(r.gather(-1, x.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1) * (seg == k)).sum(1)
        torch.testing.assert_close(e, want, rtol=1e-5, atol=1e-5)
    # two siblings: same tokens outside segment 1, different tokens in it
    sib = x.clone()
    sib[:, seg == 1] = (sib[:, seg == 1] + 1) % V
    sib[:, seg == 3] = x[:, seg == 3]
    x2, s2 = torch.where(seg <= 1, x, mask), torch.where(seg <= 1, sib, mask)
    with torch.no_grad():
        e2 = compass(torch.cat([x2, s2]), 2 / S)
        r = compass.log_ratios(torch.where(seg == 1, mask, x2), 1 / S)
    gap = (r.gather(-1, s2.clamp(max=V - 1).unsqueeze(-1)) - r.gather(-1, x2.clamp(
        max=V - 1).unsqueeze(-1))).squeeze(-1)[:, seg == 1].sum(1)  # fmt: skip
    torch.testing.assert_close(e2[:6] - e2[6:], gap, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="scores states at the segment ends t = 1/4"):
        compass(x, 0.3)
    with pytest.raises(ConfigError, match="scores states at the segment ends"):
        compass(x, 0.0)
