"""CONTRIBUTING.md's recipes, followed as written: add a model role, a scorer, a data source."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.flow_model import FlowModel, ModelConfig, teacher_config
from tsdfm.models.rng import trajectory_seed
from tsdfm.models.roles import register_role, registered_roles
from tsdfm.models.scorer import Scorer


# ------------------------------------------------------------------------ add a model role
class CriticModel(nn.Module):
    """A new role's module: one scalar per sequence from a bag of token embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.input_vocab, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x_t).mean(1)).squeeze(-1)


def test_add_a_model_role(tmp_path, tiny_language):
    register_role("critic", CriticModel)
    assert "critic" in registered_roles()
    base = teacher_config(tiny_language.vocab_size, tiny_language.seq_len, d_model=16, n_heads=2)
    critic = CriticModel(replace(base, role="critic"))
    ident = save_checkpoint(tmp_path / "critic", critic, tiny_language.tokenizer())
    ck = load_checkpoint(tmp_path / "critic", role="critic")
    assert type(ck.model) is CriticModel and ck.config.role == "critic" and ck.identity == ident
    x = tiny_language.sample(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ck.model(x), critic(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="is a critic checkpoint"):
        load_checkpoint(tmp_path / "critic", role="teacher")
    register_role("critic", CriticModel)  # again, same class: nothing changes
    with pytest.raises(ConfigError, match="already registered"):
        register_role("teacher", CriticModel)  # a built-in role cannot be replaced
    with pytest.raises(ConfigError, match="lower-case"):
        register_role("Not A Name", CriticModel)


def test_an_unknown_role_is_one_line_naming_the_registered_ones(tmp_path, tiny_language):
    cfg = teacher_config(tiny_language.vocab_size, tiny_language.seq_len, d_model=16, n_heads=2)
    save_checkpoint(tmp_path / "t", FlowModel(cfg), tiny_language.tokenizer())
    raw = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**raw, "role": "oracle"}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "t")
    message = str(err.value)
    assert "\n" not in message and "unknown role 'oracle'" in message
    for role in ("compass", "student", "teacher"):
        assert role in message
    with pytest.raises(ConfigError, match=r"registered roles: .*teacher"):
        replace(cfg, role="oracle")


# ---------------------------------------------------------------------------- add a scorer
class RepeatScorer:
    """E(x_t) = number of adjacent revealed positions holding the same token."""

    name = "repeats"

    def __init__(self, mask_token_id: int):
        self.mask_token_id = mask_token_id
        self.identity = f"repeats:mask={mask_token_id}"

    def energy(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        same = (x_t[:, 1:] == x_t[:, :-1]) & (x_t[:, 1:] != self.mask_token_id)
        return same.sum(1).float()


class ProposalScorer(RepeatScorer):
    """The same energy minus log q: a scorer that asks for the proposal."""

    name = "repeats-ratio"
    uses_proposal = True

    def __init__(self, mask_token_id: int):
        super().__init__(mask_token_id)
        self.seen: list[torch.Tensor] = []

    def energy(self, x_t, t, log_q: torch.Tensor | None = None) -> torch.Tensor:
        assert log_q is not None, "the navigator passes log q to a scorer that uses it"
        self.seen.append(log_q.clone())
        return super().energy(x_t, t) + log_q.float()


def test_add_a_scorer_and_build_a_batch_with_it_in_memory(saved_tiny_teacher):
    from tsdfm.models.data.schema import TrajectoryBatch, from_arrow, to_arrow
    from tsdfm.models.navigator import NavigatorConfig, navigate

    teacher = load_checkpoint(saved_tiny_teacher, role="teacher")
    tcfg = teacher.config
    scorer = RepeatScorer(tcfg.mask_token_id)
    assert isinstance(scorer, Scorer)
    cfg = NavigatorConfig(student_steps=4, teacher_steps=16, candidates=4, tau=0.25)
    ids = torch.arange(6)
    seeds = trajectory_seed(0, ids)
    res = navigate(teacher.model, scorer, tcfg.path(), seeds, tcfg.seq_len, cfg)
    assert res.shaped.tolist() == [False, True, True, True]
    for k in (1, 2, 3):
        e = res.energies[:, k]
        assert torch.equal(res.chosen[:, k], e.argmin(1))  # argmin selection
        kept = e.gather(1, res.chosen[:, k, None]).squeeze(1)
        assert torch.equal(kept, scorer.energy(res.states[:, k + 1], 0.0))
    batch = TrajectoryBatch(
        trajectory_id=ids.numpy(),
        shard=0,
        seed=seeds.numpy(),
        times=res.times.numpy(),
        states=res.states.numpy(),
        energies=res.energies.numpy(),
        shaped=res.shaped.numpy(),
        chosen=res.chosen.numpy(),
    )
    back = from_arrow(to_arrow(batch))
    assert back.equals(batch) and back.num_candidates == 4
    assert np.isnan(back.energies[:, 0]).all()  # the blind segment stores no energies

    proposal = ProposalScorer(tcfg.mask_token_id)
    res_q = navigate(teacher.model, proposal, tcfg.path(), seeds, tcfg.seq_len, cfg)
    assert len(proposal.seen) == 3  # one call per shaped segment
    for log_q in proposal.seen:
        assert log_q.dtype == torch.float64 and log_q.shape == (6 * 4,)
        assert (log_q <= 0).all() and (log_q < 0).any()
    assert torch.equal(res_q.states[:, :2], res.states[:, :2])  # same blind start


# ----------------------------------------------------------------------- add a data source
class PoolSource:
    """A finite dataset: a fixed pool of sequences of the synthetic language, drawn once."""

    def __init__(self, language, pool: int = 64, heldout: int = 32):
        self.language = language
        self.vocab_size = language.vocab_size
        self.seq_len = language.seq_len
        rows = language.sample(pool + heldout, torch.Generator().manual_seed(7))
        self.train, self.held = rows[:pool], rows[pool:]
        self.heldout_calls = 0

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.train[torch.randint(len(self.train), (batch_size,), generator=generator)]

    def heldout(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        self.heldout_calls += 1
        return self.held[torch.randint(len(self.held), (batch_size,), generator=generator)]

    def tokenizer(self):
        return self.language.tokenizer(with_mask=True)  # [MASK] is the last id

    def checkpoint_files(self) -> dict[str, str]:
        return {"language.json": json.dumps(self.language.to_dict())}

    def describe(self) -> dict:
        return {"kind": "synthetic", "language": "language.json", "pool": len(self.train)}


def test_add_a_data_source_to_the_teacher_trainer(tmp_path, tiny_language):
    from tsdfm.models.train.teacher import TeacherTrainConfig, train_teacher

    source = PoolSource(tiny_language)
    cfg = TeacherTrainConfig(
        out=str(tmp_path / "run"),
        d_model=16,
        n_layers=1,
        n_heads=2,
        steps=3,
        batch_size=4,
        warmup=1,
        checkpoint_every=2,
        eval_every=2,
    )
    result = train_teacher(cfg, source)
    ck = load_checkpoint(result.final_dir, role="teacher")
    assert ck.config.data == source.describe()
    assert ck.config.vocab_size == tiny_language.vocab_size
    assert ck.tokenizer.get_vocab_size() == tiny_language.vocab_size + 1
    assert json.loads(ck.file("language.json").read_text()) == tiny_language.to_dict()


def test_add_a_data_source_to_the_compass_metrics(saved_tiny_teacher, tiny_language):
    from tsdfm.models.eval.compass_metrics import CompassEvalConfig, evaluate_scorer

    teacher = load_checkpoint(saved_tiny_teacher, role="teacher")
    source = PoolSource(tiny_language)
    cfg = CompassEvalConfig(
        times=(0.5, 1.0),
        samples=16,
        seeds=1,
        teacher_steps=8,
        student_steps=4,
        candidates=2,
        midpoints=(2,),
    )
    scorer = RepeatScorer(teacher.config.mask_token_id)
    report = evaluate_scorer(scorer, teacher, cfg, data=source)
    assert report["data"] == source.describe() and source.heldout_calls == 2
    assert all(0.0 <= a <= 1.0 for a in report["auc"]["mean"])
    short = PoolSource(tiny_language)
    short.seq_len = tiny_language.seq_len + 1
    with pytest.raises(ConfigError, match="sequence length"):
        evaluate_scorer(scorer, teacher, cfg, data=short)
