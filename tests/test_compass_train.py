"""Compass NCE training: it learns, resumes exactly, refuses bad input; and its CLI."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.compass import TeacherMismatchWarning, compass_config, load_compass
from tsdfm.models.data.sources import SyntheticSource
from tsdfm.models.errors import CheckpointError, ConfigError, DataError
from tsdfm.models.eval.compass_metrics import energy_auc
from tsdfm.models.flow_model import CompassModel, FlowModel, teacher_config
from tsdfm.models.path import MixturePath, PolynomialScheduler
from tsdfm.models.rng import CounterRNG
from tsdfm.models.solver import RevealPlan, noise_like, sample, teacher_states
from tsdfm.models.train.common import seeded
from tsdfm.models.train.compass import (
    CompassTrainConfig,
    TeacherNegatives,
    _jsonable,
    nce_loss,
    token_compass_init,
    token_ratio_loss,
    train_compass,
)
from tsdfm.pipeline.cli import app

DATA = {"kind": "synthetic", "language": "language.json"}


def _save_teacher(path, lang, seed=0):
    cfg = teacher_config(
        lang.vocab_size, lang.seq_len, d_model=32, n_layers=2, n_heads=2, data=DATA
    )
    with seeded(seed):
        model = FlowModel(cfg)
    save_checkpoint(path, model, lang.tokenizer(), {"language.json": json.dumps(lang.to_dict())})
    return path


def _cfg(out, **kw):
    base = dict(
        out=str(out),
        d_model=16,
        n_layers=1,
        n_heads=2,
        steps=8,
        batch_size=16,
        lr=3e-3,
        warmup=2,
        teacher_steps=16,
        bank_trajectories=16,
        records_per_trajectory=4,
        refresh_every=3,
        heldout_trajectories=16,
        checkpoint_every=4,
        eval_every=4,
        seed=1,
    )
    base.update(kw)
    return CompassTrainConfig(**base)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_language):
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "t", tiny_language)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher_dir):
    """A compass trained for 300 tiny steps (shared by the tests that read its results)."""
    losses = []
    cfg = _cfg(
        tmp_path_factory.mktemp("run") / "c",
        steps=300,
        batch_size=32,
        warmup=10,
        bank_trajectories=32,
        refresh_every=50,
        heldout_trajectories=32,
        checkpoint_every=300,
        eval_every=100,
    )
    res = train_compass(cfg, teacher_dir, progress=lambda s, n, m: losses.append(m["loss"]))
    return res, losses


def test_nce_loss_is_ln2_at_zero_energy_and_rewards_low_energy_on_real_data():
    zero = torch.zeros(4)
    assert nce_loss(zero, zero).item() == pytest.approx(math.log(2))
    good = nce_loss(torch.full((4,), -5.0), torch.full((4,), 5.0)).item()
    bad = nce_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)).item()
    assert good == pytest.approx(math.log1p(math.exp(-5))) and bad > 5.0


def test_teacher_states_are_the_teacher_sampler_trajectories(tiny_language, teacher_dir):
    teacher = load_checkpoint(teacher_dir)
    path, L, N = teacher.config.path(), tiny_language.seq_len, 16
    seeds = torch.arange(6, dtype=torch.long) + 2**32
    record = torch.tensor([[0, 4, 9, 16]]).expand(6, 4)
    states = teacher_states(teacher.model, path, CounterRNG(seeds), L, N, record)
    assert states.shape == (6, 4, L)
    assert torch.equal(states[:, 3], sample(teacher.model, path, seeds, L, N).x_1)
    masked = (states == tiny_language.vocab_size).sum(-1)  # (6, 4)
    assert (masked[:, 0] == L).all() and (masked[:, 3] == 0).all()
    assert (masked.diff(dim=1) <= 0).all()  # a revealed token stays revealed
    # per-row times: each row recorded at its own grid index gives the same states
    own = teacher_states(teacher.model, path, CounterRNG(seeds), L, N, record[:, [2, 0, 3, 1]])
    assert torch.equal(own, states[:, [2, 0, 3, 1]])


def test_negative_banks_are_pure_functions_of_the_refresh_index(teacher_dir):
    teacher = load_checkpoint(teacher_dir)
    neg = TeacherNegatives(teacher.model, teacher.identity, 16, 8, 3, 8, seed=4)
    x0, t0 = neg.bank(0)
    x0b, t0b = neg.bank(0)
    x1, _ = neg.bank(1)
    xh, _ = neg.heldout()
    assert x0.shape == (24, teacher.config.seq_len) and t0.shape == (24,)
    assert torch.equal(x0, x0b) and torch.equal(t0, t0b)
    assert not torch.equal(x0, x1) and not torch.equal(x0, xh)
    assert t0.min() >= 0.0 and t0.max() <= 1.0 and len(set(t0.tolist())) > 3


def test_loss_falls_and_the_compass_separates_clean_from_corrupted(tiny_language, trained):
    res, losses = trained
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.6 and last < first - 0.2, (first, last)
    assert res.heldout_auc > 0.8 and res.heldout_loss < math.log(2) - 0.1
    scorer = load_compass(res.final_dir)
    gen = torch.Generator().manual_seed(11)
    clean = tiny_language.sample(200, gen)
    noise = torch.randint(0, tiny_language.vocab_size, clean.shape, generator=gen)
    corrupted = torch.where(torch.rand(clean.shape, generator=gen) < 0.75, noise, clean)
    e_clean, e_corrupt = scorer.energy(clean, 1.0), scorer.energy(corrupted, 1.0)
    assert energy_auc(e_clean, e_corrupt) > 0.85
    assert e_corrupt.mean() - e_clean.mean() > 2.0


def test_final_checkpoint_records_teacher_identity_and_carries_the_language(trained, teacher_dir):
    res, _ = trained
    ck = load_checkpoint(res.final_dir, role="compass")
    teacher = load_checkpoint(teacher_dir)
    prov = ck.config.provenance
    assert prov["teacher_identity"] == teacher.identity and prov["trainer"] == "compass"
    assert prov["steps"] == 300 and prov["run_config"]["batch_size"] == 32
    assert prov["heldout_auc"] == pytest.approx(res.heldout_auc)
    assert (res.final_dir / "language.json").read_text() == (
        teacher_dir / "language.json"
    ).read_text()
    assert ck.tokenizer.to_str() == teacher.tokenizer.to_str()
    assert ck.identity == res.identity and ck.config.data == teacher.config.data
    lines = (res.final_dir.parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [100, 200, 300]


def test_resume_continues_exactly(tmp_path, teacher_dir):
    full = train_compass(_cfg(tmp_path / "full"), teacher_dir)

    class Stop(Exception):
        pass

    def stop_after_checkpoint(step, total, metrics):
        if step == 5:  # the checkpoint of step 4 is written; step 5 sits inside bank 1 (3..5)
            raise Stop

    with pytest.raises(Stop):
        train_compass(_cfg(tmp_path / "resumed"), teacher_dir, progress=stop_after_checkpoint)
    resumed = train_compass(_cfg(tmp_path / "resumed"), teacher_dir)
    assert resumed.identity == full.identity
    a = load_file(str(tmp_path / "full/checkpoints/step-0000008/trainer_state.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step-0000008/trainer_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 8]


def test_changed_config_or_teacher_is_refused(tmp_path, tiny_language, teacher_dir):
    train_compass(_cfg(tmp_path / "run", steps=2), teacher_dir)
    with pytest.raises(ConfigError, match=r"different config \(changed: lr\)"):
        train_compass(_cfg(tmp_path / "run", steps=2, lr=1e-2), teacher_dir)
    other = _save_teacher(tmp_path / "other", tiny_language, seed=9)
    with pytest.raises(ConfigError, match=r"changed: teacher, negatives\)"):
        train_compass(_cfg(tmp_path / "run", steps=2), other)


def test_missing_or_empty_training_data_is_refused(tmp_path, tiny_language, teacher_dir):
    bare = _save_teacher(tmp_path / "bare", tiny_language)
    (bare / "language.json").unlink()
    with pytest.raises(DataError, match=r"language file .*language\.json does not exist"):
        train_compass(_cfg(tmp_path / "a"), bare)

    class Empty(SyntheticSource):
        def batch(self, batch_size, generator):
            return torch.empty((0, self.seq_len), dtype=torch.long)

        heldout = batch

    with pytest.raises(DataError, match=r"held-out data is empty \(got shape \(0, 8\)\)"):
        train_compass(_cfg(tmp_path / "b"), teacher_dir, Empty(tiny_language))
    from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage

    wider = SyntheticLanguage.generate(LanguageConfig(vocab_size=20, num_states=4, branching=3))
    with pytest.raises(DataError, match=r"vocabulary 20 and length 64, teacher .* has 12 and 8"):
        train_compass(_cfg(tmp_path / "c"), teacher_dir, SyntheticSource(wider))
    with pytest.raises(CheckpointError, match="is a compass checkpoint, but a teacher is needed"):
        train_compass(_cfg(tmp_path / "d"), _compass_dir(tmp_path, teacher_dir))


def _compass_dir(tmp_path, teacher_dir):
    res = train_compass(_cfg(tmp_path / "tiny", steps=1), teacher_dir)
    return res.final_dir


class ForeignNegatives:
    """Negatives that claim to come from another teacher."""

    def __init__(self, inner):
        self.inner = inner
        self.teacher_identity = "sha256:" + "f" * 64

    def bank(self, refresh):
        return self.inner.bank(refresh)

    def heldout(self):
        return self.inner.heldout()

    def describe(self):
        return {"kind": "foreign", "teacher_identity": self.teacher_identity}


def test_negatives_of_another_teacher_are_refused_unless_allowed(tmp_path, teacher_dir):
    teacher = load_checkpoint(teacher_dir)
    inner = TeacherNegatives(teacher.model, teacher.identity, 16, 8, 2, 8, seed=0)
    neg = ForeignNegatives(inner)
    with pytest.raises(
        CheckpointError, match=r"negative source foreign was built from teacher sha256:ffff"
    ):
        train_compass(_cfg(tmp_path / "a", steps=2), teacher, negatives=neg)
    with pytest.warns(TeacherMismatchWarning, match="not from teacher"):
        res = train_compass(
            _cfg(tmp_path / "b", steps=2), teacher, negatives=neg, allow_teacher_mismatch=True
        )
    assert load_checkpoint(res.final_dir).config.provenance["negatives"]["kind"] == "foreign"


# ---------------------------------------------------------------------------- reveal orders
def _revealed(x, path):
    return x != path.mask_token_id


@pytest.mark.parametrize(("L", "S"), [(64, 8), (8, 3)])
def test_dilated_noise_like_reveals_exactly_the_segments_before_t(L, S):
    V, B = 5, 2000
    path = MixturePath(PolynomialScheduler(1.0), "mask", V, V)
    plan = RevealPlan("dilated", S)
    seg = plan.segment_of(path, L)
    gen = torch.Generator().manual_seed(0)
    x_1 = torch.randint(0, V, (B, L), generator=gen)
    for k in range(S + 1):  # at a segment end t = k / S (float32, as the bank holds it)
        x_t = noise_like(path, plan, x_1, torch.full((B,), k / S), gen)
        assert torch.equal(_revealed(x_t, path), (seg < k).expand(B, L))
        assert torch.equal(x_t[:, seg < k], x_1[:, seg < k])
    for k in range(S):  # inside segment k only its own positions are partly revealed
        frac = 0.3
        t = torch.full((B,), (k + frac) / S)
        r = _revealed(noise_like(path, plan, x_1, t, gen), path)
        assert r[:, seg < k].all() and not r[:, seg > k].any()
        # each position of segment k is revealed at a uniform time in it: P = tS − k
        assert r[:, seg == k].double().mean().item() == pytest.approx(frac, abs=0.03)


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_random_noise_like_is_the_path_sample_bit_for_bit(source):
    V, B, L = 7, 32, 10
    path = MixturePath(PolynomialScheduler(2.0), source, V, V if source == "mask" else None)
    x_1 = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(1))
    t = torch.rand(B, generator=torch.Generator().manual_seed(2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = noise_like(path, RevealPlan("random", 4), x_1, t, g1)
    b = path.sample(x_1, t, g2).x_t
    assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())


def test_dilated_negatives_have_the_reveal_pattern_of_the_positives(tiny_language, teacher_dir):
    teacher = load_checkpoint(teacher_dir)
    path, L, N, S = teacher.config.path(), tiny_language.seq_len, 16, 4
    plan = RevealPlan("dilated", S)
    seg = plan.segment_of(path, L)
    B = 6
    seeds = torch.arange(B, dtype=torch.long) + 2**32
    ends = torch.arange(0, N + 1, N // S)  # 0, 4, 8, 12, 16
    record = ends.expand(B, S + 1)
    neg = teacher_states(teacher.model, path, CounterRNG(seeds), L, N, record, plan=plan)
    gen = torch.Generator().manual_seed(5)
    for k in range(S + 1):
        x_1 = tiny_language.sample(B, gen)
        pos = noise_like(path, plan, x_1, torch.full((B,), k / S), gen)
        assert torch.equal(_revealed(neg[:, k], path), (seg < k).expand(B, L))
        assert torch.equal(_revealed(neg[:, k], path), _revealed(pos, path))
    # a bank: at segment ends the patterns agree exactly; in between both lie between the
    # segment's start and end patterns, and reveal segment k at the same rate tS − k
    source = TeacherNegatives(teacher.model, teacher.identity, N, 256, 4, 8, seed=2, plan=plan)
    x_neg, t = source.bank(0)
    x_pos = noise_like(path, plan, tiny_language.sample(len(t), gen), t, gen)
    k = (t.double() * S).floor().long().clamp(max=S - 1)
    at_end = (t.double() * S).frac() == 0
    r_neg, r_pos = _revealed(x_neg, path), _revealed(x_pos, path)
    assert at_end.sum() > 10 and torch.equal(r_neg[at_end], r_pos[at_end])
    for r in (r_neg, r_pos):
        assert torch.equal(r[at_end], seg.unsqueeze(0) < (t[at_end, None] * S).round())
        assert r[seg < k[:, None]].all() and not r[seg > k[:, None]].any()
    inner = ~at_end
    excess = t[inner].double() * S - k[inner]  # expected share of segment k revealed
    own = seg.unsqueeze(0) == k[inner, None]
    for r in (r_neg[inner], r_pos[inner]):
        share = (r & own).sum(1).double() / own.sum(1)
        assert (share - excess).mean().abs().item() < 0.04
    assert source.describe()["reveal_order"] == "dilated"
    assert source.describe()["student_steps"] == S
    plain = TeacherNegatives(teacher.model, teacher.identity, N, 4, 2, 4, seed=2)
    assert "reveal_order" not in plain.describe() and "student_steps" not in plain.describe()


def test_default_run_records_exactly_what_the_bundled_compass_recorded(tiny_teacher):
    """The bundled compass is the default run: its run config and negatives description, and
    with them the identity of a default run, must not change."""
    from tsdfm.models.checkpoint import bundled_path

    prov = json.loads((bundled_path("compass") / "config.json").read_text())["provenance"]
    assert _jsonable(CompassTrainConfig(out="runs/compass")) == prov["run_config"]
    # under the random order student_steps is ignored and not recorded
    assert _jsonable(CompassTrainConfig(out="x", student_steps=3)) == prov["run_config"]
    neg = TeacherNegatives(
        tiny_teacher, prov["teacher_identity"], 1024, 256, 16, 128, 0, temperature=2.0
    )
    assert neg.describe() == prov["negatives"]
    dilated = _jsonable(CompassTrainConfig(out="x", reveal_order="dilated"))
    assert dilated == {**prov["run_config"], "reveal_order": "dilated", "student_steps": 8}


def test_reveal_order_options_are_validated(tmp_path, tiny_language, teacher_dir):
    with pytest.raises(ConfigError, match=r"reveal_order='zigzag' is unknown; use random or"):
        _cfg(tmp_path, reveal_order="zigzag")
    with pytest.raises(ConfigError, match="student_steps=0 must be a positive integer"):
        _cfg(tmp_path, reveal_order="dilated", student_steps=0)
    with pytest.raises(ConfigError, match=r"teacher_steps=16 is not divisible by student_st"):
        _cfg(tmp_path, reveal_order="dilated", student_steps=3)
    cfg = teacher_config(
        tiny_language.vocab_size,
        tiny_language.seq_len,
        "uniform",
        d_model=16,
        n_layers=1,
        n_heads=2,
        data=DATA,
    )
    with seeded(0):
        uniform = FlowModel(cfg)
    save_checkpoint(
        tmp_path / "u",
        uniform,
        tiny_language.tokenizer(),
        {"language.json": json.dumps(tiny_language.to_dict())},
    )
    dilated = _cfg(tmp_path / "a", reveal_order="dilated", student_steps=4, steps=1)
    with pytest.raises(ConfigError, match=r"needs a mask-source teacher, but teacher .* uniform"):
        train_compass(dilated, tmp_path / "u")
    teacher = load_checkpoint(teacher_dir)
    plain = TeacherNegatives(teacher.model, teacher.identity, 16, 8, 2, 8, seed=0)
    with pytest.raises(ConfigError, match="follows the random reveal order, but the run trains"):
        train_compass(dilated, teacher, negatives=plain)


def test_a_dilated_run_is_refused_where_a_random_one_ran(tmp_path, teacher_dir):
    train_compass(_cfg(tmp_path / "run", steps=1), teacher_dir)
    dilated = _cfg(tmp_path / "run", steps=1, reveal_order="dilated", student_steps=4)
    with pytest.raises(ConfigError, match=r"changed: reveal_order, student_steps, negatives\)"):
        train_compass(dilated, teacher_dir)


# ---------------------------------------------------------------------------- CLI
runner = CliRunner()


def _error_line(result):
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    return lines[-1]


def test_cli_train_then_eval(tmp_path, teacher_dir):
    out = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "compass",
            "train",
            "--teacher",
            str(teacher_dir),
            "--out",
            str(out),
            "--steps",
            "6",
            "--d-model",
            "16",
            "--n-layers",
            "1",
            "--teacher-steps",
            "16",
            "--bank-trajectories",
            "8",
            "--records-per-trajectory",
            "2",
            "--heldout-trajectories",
            "8",
            "--eval-every",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "held-out ROC AUC (real vs teacher states): 0." in res.output
    report = tmp_path / "r.json"
    res = runner.invoke(
        app,
        [
            "compass",
            "eval",
            "--compass",
            str(out / "final"),
            "--teacher",
            str(teacher_dir),
            "--samples",
            "16",
            "--seeds",
            "2",
            "--teacher-steps",
            "16",
            "--candidates",
            "3",
            "--midpoint",
            "4",
            "--json",
            str(report),
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(report.read_text())
    assert len(r["auc"]["mean"]) == 4 and all(0 <= a <= 1 for a in r["auc"]["mean"])
    assert [m["k"] for m in r["selection"]["midpoints"]] == [4]
    assert r["scorer"]["teacher_identity"] == r["teacher"]["identity"]
    assert "Spearman" in res.output and "gain" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compass", "train", "--out", "{tmp}/r", "--teacher", "t.pt"], "pickle"),
        (
            ["compass", "train", "--out", "{tmp}/r", "--teacher", "{teacher}", "--steps", "0"],
            "steps=0 must be a positive integer",
        ),
        (
            ["compass", "train", "--out", "{tmp}/r", "--teacher", "{teacher}", "--ema", "1.5"],
            "ema in [0, 1)",
        ),
        (
            ["compass", "train", "--out", "{tmp}/r", "--teacher", "{teacher}", "--device", "cuda"],
            "no CUDA GPU",
        ),
        (
            [
                "compass",
                "train",
                "--out",
                "{tmp}/r",
                "--teacher",
                "{teacher}",
                "--reveal-order",
                "zigzag",
            ],
            # the CLI's choice of orders refuses it before the config does (same one line)
            "'zigzag' is not one of 'random', 'dilated'",
        ),
        (
            ["compass", "eval", "--compass", "{teacher}", "--teacher", "{teacher}"],
            "is a teacher checkpoint, but a compass is needed",
        ),
        (["compass", "eval", "--compass", "{tmp}/none", "--teacher", "{teacher}"], "not found"),
        (
            ["compass", "eval", "--compass", "{compass}", "--teacher", "{other}"],
            "--allow-teacher-mismatch",
        ),
        (
            ["compass", "eval", "--compass", "{compass}", "--teacher", "{wide}"],
            "does not fit teacher",
        ),
        (
            [
                "compass",
                "eval",
                "--compass",
                "{compass}",
                "--teacher",
                "{teacher}",
                "--candidates",
                "1",
            ],
            "candidates=1 must be at least 2",
        ),
    ],
)
def test_cli_errors_are_one_line_with_exit_2(
    tmp_path, tiny_language, teacher_dir, trained, args, message
):
    from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage

    wide = SyntheticLanguage.generate(
        LanguageConfig(vocab_size=20, num_states=4, branching=3, seq_len=8)
    )
    subs = {
        "{tmp}": str(tmp_path),
        "{teacher}": str(teacher_dir),
        "{compass}": str(trained[0].final_dir),
        "{other}": str(_save_teacher(tmp_path / "other", tiny_language, seed=5)),
        "{wide}": str(_save_teacher(tmp_path / "wide", wide)),
    }
    for key, value in subs.items():
        args = [a.replace(key, value) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    line = _error_line(res)
    assert line.startswith("error: ") and message in line, line
    assert "Traceback" not in res.output


def test_allow_teacher_mismatch_flag_evaluates_anyway(tmp_path, tiny_language, trained):
    other = _save_teacher(tmp_path / "other", tiny_language, seed=5)
    res = runner.invoke(
        app,
        [
            "compass",
            "eval",
            "--compass",
            str(trained[0].final_dir),
            "--teacher",
            str(other),
            "--samples",
            "8",
            "--seeds",
            "1",
            "--teacher-steps",
            "16",
            "--candidates",
            "2",
            "--midpoint",
            "4",
            "--allow-teacher-mismatch",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "warning: compass" in res.output and "not from teacher" in res.output


def test_cli_trains_a_compass_for_a_text_teacher_from_its_corpus(tmp_path):
    from tsdfm.models.data.corpus import (
        CorpusConfig,
        TokenizedCorpus,
        load_texts,
        train_bpe_tokenizer,
        write_demo_corpus,
    )

    corpus = write_demo_corpus(tmp_path / "corpus", num_documents=6, sentences_per_document=10)
    tok = train_bpe_tokenizer(load_texts(corpus), 300)
    windows = TokenizedCorpus.from_path(corpus, tok, CorpusConfig(seq_len=16))
    data = {"kind": "corpus", "source": str(corpus), "eos_token_id": windows.eos_token_id}
    cfg = teacher_config(windows.vocab_size, 16, d_model=32, n_layers=1, n_heads=2, data=data)
    with seeded(0):
        model = FlowModel(cfg)
    teacher = tmp_path / "teacher"
    save_checkpoint(teacher, model, tok)
    small = ["--steps", "4", "--d-model", "16", "--n-layers", "1", "--teacher-steps", "8"]
    small += ["--bank-trajectories", "8", "--records-per-trajectory", "2"]
    small += ["--heldout-trajectories", "8", "--eval-every", "2"]
    base = ["compass", "train", "--teacher", str(teacher), *small]

    res = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "pass its corpus (--corpus PATH" in res.output

    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--corpus", str(corpus)])
    assert res.exit_code == 0, res.output
    compass = load_checkpoint(tmp_path / "b" / "final")
    assert compass.config.role == "compass"
    assert compass.tokenizer.get_vocab() == tok.get_vocab()
    run = json.loads((tmp_path / "b" / "run_config.json").read_text())
    assert run["data"]["kind"] == "corpus" and run["data"]["windows"] == len(windows)


def test_cli_trains_a_three_step_dilated_compass(tmp_path, tiny_language, teacher_dir):
    out = tmp_path / "run"
    args = ["compass", "train", "--teacher", str(teacher_dir), "--out", str(out)]
    args += ["--reveal-order", "dilated", "--student-steps", "3", "--teacher-steps", "15"]
    args += ["--steps", "6", "--d-model", "16", "--n-layers", "1", "--batch-size", "16"]
    args += ["--bank-trajectories", "8", "--records-per-trajectory", "4"]
    args += ["--heldout-trajectories", "8", "--eval-every", "3", "--refresh-every", "3"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "held-out ROC AUC (real vs teacher states): " in res.output
    ck = load_checkpoint(out / "final", role="compass")
    prov = ck.config.provenance
    assert prov["reveal_order"] == "dilated" and prov["student_steps"] == 3
    assert prov["negatives"]["reveal_order"] == "dilated"
    assert prov["negatives"]["student_steps"] == 3 and prov["negatives"]["teacher_steps"] == 15
    assert prov["run_config"]["reveal_order"] == "dilated"
    assert prov["run_config"]["student_steps"] == 3
    assert 0.0 <= prov["heldout_auc"] <= 1.0
    run = json.loads((out / "run_config.json").read_text())
    assert run["run"] == prov["run_config"] and run["negatives"] == prov["negatives"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["heldout_loss"]) for m in metrics)
    # rerunning the finished command resumes it and reproduces the same compass
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert load_checkpoint(out / "final", role="compass").identity == ck.identity


# ---------------------------------------------------------------------------- token-ratio compass
def _token_cfg(out, **kw):
    base = dict(head="tokens", reveal_order="dilated", student_steps=4, negative_temperature=1.0,
                d_model=32, n_layers=2, n_heads=2, steps=300, batch_size=32, lr=1e-2, warmup=10,
                heldout_trajectories=64, checkpoint_every=300, eval_every=300, seed=1)  # fmt: skip
    base.update(kw)
    return CompassTrainConfig(out=str(out), **base)


def _centred(r, log_q):
    """r minus its q-mean per position: the per-position constant that siblings share, out."""
    return r - (log_q.exp() * r).sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def token_trained(tmp_path_factory, teacher_dir):
    cfg = _token_cfg(tmp_path_factory.mktemp("token") / "c")
    return train_compass(cfg, teacher_dir), cfg


def test_token_ratio_loss_is_the_teachers_cross_entropy_at_zero_and_optimal_at_the_ratio():
    gen = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(torch.randn(1, 1, 5, generator=gen), -1).double()
    log_p = torch.log_softmax(torch.randn(1, 1, 5, generator=gen), -1).double()
    where = torch.ones(1, 1, dtype=torch.bool)

    def expected(r):  # E_{v ~ p} of the loss with the real token v
        return sum(
            log_p[0, 0, v].exp() * token_ratio_loss(r, torch.tensor([[v]]), log_q, where)
            for v in range(5)
        )

    zero = torch.zeros_like(log_q)
    assert expected(zero).item() == pytest.approx(-(log_p.exp() * log_q).sum().item())
    best = expected(log_p - log_q)  # = H(p), the least any r can reach
    assert best.item() == pytest.approx(-(log_p.exp() * log_p).sum().item())
    assert expected(log_p - log_q + 3.0).item() == pytest.approx(best.item())  # constant: free
    assert expected(0.5 * (log_p - log_q)).item() > best.item() + 1e-3


def test_token_ratio_training_recovers_the_exact_per_token_ratio(
    tiny_language, teacher_dir, token_trained
):
    """On held-out real contexts of the dilated order, the learned log-ratios of the next
    segment's positions track log p(v | X, i) − log q(v | X, i) of the exact language."""
    res, cfg = token_trained
    compass = load_checkpoint(res.final_dir, role="compass")
    teacher = load_checkpoint(teacher_dir)
    prov = compass.config.provenance
    assert compass.config.backbone.head == "tokens"
    assert (prov["reveal_order"], prov["student_steps"], prov["run_config"]["head"]) == (
        "dilated", 4, "tokens")  # fmt: skip
    assert prov["init"] == "teacher"  # the teacher's size: it started from its weights
    plan, path, mask = cfg.plan(), teacher.config.path(), teacher.config.mask_token_id
    gen = torch.Generator().manual_seed(123)
    x_1 = tiny_language.sample(256, gen)
    k = torch.randint(0, 4, (256,), generator=gen)
    x = noise_like(path, plan, x_1, k.double() / 4, gen)
    with torch.no_grad():
        log_q = torch.log_softmax(teacher.model(x, k.float() / 4), -1).double()
        r = compass.model.log_ratios(x, k.float() / 4).double()
    exact = torch.log_softmax(tiny_language.posterior_logits(x, mask), -1) - log_q
    scored = plan.segment_of(path, x.shape[1]).unsqueeze(0) == k.unsqueeze(1)
    # at the tokens the teacher proposes there (what selection weighs)
    drawn = torch.multinomial(log_q[scored].exp(), 4, replacement=True, generator=gen)
    a = _centred(r, log_q)[scored].gather(1, drawn).flatten()
    b = _centred(exact, log_q)[scored].gather(1, drawn).flatten()
    rho = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert rho > 0.75, rho  # 0.845 here; 0.565 after 150 steps at lr 3e-3
    # and it learned: the held-out AUC of real vs teacher tokens is far from chance
    assert res.heldout_auc > 0.75, res.heldout_auc


def test_token_ratio_options_are_validated(tmp_path, tiny_language, teacher_dir):
    with pytest.raises(ConfigError, match="use reveal_order dilated and negative_temperature 1"):
        _token_cfg(tmp_path, reveal_order="random")
    with pytest.raises(ConfigError, match="use reveal_order dilated and negative_temperature 1"):
        _token_cfg(tmp_path, negative_temperature=2.0)
    with pytest.raises(ConfigError, match="head='pooled' is unknown; use scalar or tokens"):
        _cfg(tmp_path, head="pooled")
    # another size than the teacher's starts from its own initialisation, still at r ≡ 0
    teacher = load_checkpoint(teacher_dir)
    plan = {"reveal_order": "dilated", "student_steps": 4}
    small = CompassModel(compass_config(teacher.config, 16, 1, 2, provenance=plan, head="tokens"))
    assert token_compass_init(small, teacher) == "random"
    x = torch.full((2, small.config.seq_len), small.config.mask_token_id)
    assert small.log_ratios(x, 0.5).abs().max().item() == 0.0
    bank = TeacherNegatives(teacher.model, teacher.identity, 16, 8, 2, 8, seed=0)
    with pytest.raises(ConfigError, match="it uses no negative source"):
        train_compass(_token_cfg(tmp_path / "neg", steps=1), teacher, negatives=bank)
    # a scalar run records no head (the bundled compass's identity); a token run does, and
    # drops the bank fields it never uses
    assert "head" not in _jsonable(_cfg(tmp_path))
    rec = _jsonable(_token_cfg(tmp_path))
    assert rec["head"] == "tokens" and "bank_trajectories" not in rec


def test_softmax_selection_with_the_token_compass_moves_the_data_toward_the_language(
    tiny_language, teacher_dir, token_trained
):
    """Through the navigator (dilated, shared reveals, softmax at T = 1), the trained token-ratio
    compass makes the finals likelier under the language than the blind teacher's."""
    from tsdfm.models.compass import CompassScorer
    from tsdfm.models.navigator import NavigatorConfig, navigate

    res, _ = token_trained
    teacher = load_checkpoint(teacher_dir)
    scorer = CompassScorer.from_checkpoint(load_checkpoint(res.final_dir, role="compass"))
    seeds = torch.arange(512) + 11
    nll = {}
    for K in (1, 8):
        cfg = NavigatorConfig(student_steps=4, teacher_steps=4, candidates=K,
                              reveal_order="dilated", shared_reveals=True, selection="softmax",
                              temperature=1.0)  # fmt: skip
        out = navigate(teacher.model, scorer, teacher.config.path(), seeds, 8, cfg)
        nll[K] = -tiny_language.log_likelihood(out.states[:, -1]).mean().item()
    assert nll[8] < nll[1] - 5.0, nll  # 35.9 → 25.4 nats per sequence


def test_cli_trains_a_token_compass_of_the_teachers_size(tmp_path, tiny_language, teacher_dir):
    out = tmp_path / "run"
    args = ["compass", "train", "--teacher", str(teacher_dir), "--out", str(out), "--head"]
    args += ["tokens", "--reveal-order", "dilated", "--student-steps", "4", "--steps", "4"]
    args += ["--batch-size", "8", "--heldout-trajectories", "8", "--eval-every", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "held-out ROC AUC (real vs teacher tokens): " in res.output
    ck = load_checkpoint(out / "final", role="compass")
    run = ck.config.provenance["run_config"]
    size = load_checkpoint(teacher_dir).config.backbone  # defaults: the teacher's size, T = 1
    assert (run["head"], run["negative_temperature"]) == ("tokens", 1.0)
    assert (run["d_model"], run["n_layers"], run["n_heads"]) == (
        size.d_model,
        size.n_layers,
        size.n_heads,
    )
    # the random order cannot give a token compass: one line, nothing trained
    bad = runner.invoke(app, [*args[:-12], "--out", str(tmp_path / "bad"), "--steps", "4"])
    assert bad.exit_code == 2 and "use reveal_order dilated" in bad.output


def test_a_shard_built_with_the_token_compass_records_its_energies(
    tmp_path, teacher_dir, token_trained
):
    """The build's own shard writer (what each Ray actor runs) with a token-ratio compass:
    dilated, shared reveals, softmax at T = 1; the recorded energy of each kept state is the
    compass's energy of it."""
    from tsdfm.models.data.schema import decode_rows
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.pipeline.config import BuildConfig
    from tsdfm.pipeline.shards import read_shard
    from tsdfm.pipeline.worker import ShardBuilder

    res, _ = token_trained
    nav = NavigatorConfig(student_steps=4, teacher_steps=4, candidates=4, reveal_order="dilated",
                          shared_reveals=True, selection="softmax", temperature=1.0)  # fmt: skip
    cfg = BuildConfig(str(teacher_dir), compass=str(res.final_dir), shards=1,
                      trajectories_per_shard=6, batch_size=6, navigator=nav)  # fmt: skip
    root = tmp_path / "ds"
    builder = ShardBuilder(cfg, str(root))
    result = builder.build(0)
    assert result.info.rows == 6
    rows = decode_rows(read_shard(str(root), result.info.path)[0])
    energies = torch.as_tensor(rows.energies, dtype=torch.float32)  # (6, S, K)
    assert energies.shape == (6, 4, 4) and bool(torch.isfinite(energies).all())
    states = torch.as_tensor(rows.states)
    kept = builder.scorer.energy(states[:, 2], float(rows.times[0][2]))
    chosen = torch.as_tensor(rows.chosen)[:, 1].long()
    recorded = energies[torch.arange(6), 1, chosen]
    torch.testing.assert_close(kept.float(), recorded, atol=1e-2, rtol=1e-3)  # float16 column
