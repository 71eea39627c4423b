import pytest
import torch

from tsdfm.models.errors import ConfigError
from tsdfm.models.navigator import NavigatorConfig, navigate
from tsdfm.models.rng import CounterRNG
from tsdfm.models.solver import rollout, sample, uniform_grid


class TokenSumScorer:
    """A deterministic energy: weighted sum of token ids ([MASK] counts as 0)."""

    def __init__(self, vocab_size):
        self.V = vocab_size
        self.calls = []

    def energy(self, x, t):
        self.calls.append((x.shape[0], t))
        w = torch.arange(1, x.shape[1] + 1, dtype=torch.float32)
        return ((x % (self.V + 1)).float() * (x != self.V) * w).sum(1) / 100.0


def _nav(teacher, scorer, seeds, **kw):
    cfg = NavigatorConfig(**{"student_steps": 4, "teacher_steps": 32, "candidates": 3, **kw})
    return navigate(teacher, scorer, teacher.path, seeds, teacher.config.seq_len, cfg), cfg


def test_k1_equals_the_plain_teacher_sampler(tiny_teacher):
    seeds = torch.arange(24) + 5
    res, _ = _nav(tiny_teacher, None, seeds, candidates=1)
    plain = sample(tiny_teacher, tiny_teacher.path, seeds, tiny_teacher.config.seq_len, 32)
    assert torch.equal(res.states[:, -1], plain.x_1)
    assert not res.shaped.any() and (res.chosen == 0).all() and (res.energies == 0).all()
    # intermediate states are the teacher's states at the midpoints
    rng = CounterRNG(seeds)
    x = tiny_teacher.path.sample_source((24, tiny_teacher.config.seq_len), rng)
    grid = uniform_grid(32)
    x, _ = rollout(tiny_teacher, tiny_teacher.path, x, grid[:17], rng)
    assert torch.equal(res.states[:, 2], x)
    assert torch.allclose(res.times, torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


def test_teacher_temperature_is_the_tempered_teacher_sampler(tiny_teacher):
    seeds = torch.arange(24) + 5
    L = tiny_teacher.config.seq_len
    res, _ = _nav(tiny_teacher, None, seeds, candidates=1, teacher_temperature=0.5)
    hot = sample(tiny_teacher, tiny_teacher.path, seeds, L, 32, temperature=0.5)
    assert torch.equal(res.states[:, -1], hot.x_1)
    plain = sample(tiny_teacher, tiny_teacher.path, seeds, L, 32)
    assert not torch.equal(hot.x_1, plain.x_1)
    # shaped: every candidate is a tempered rollout, so lane 0 is still the blind tempered one
    scorer = TokenSumScorer(tiny_teacher.config.vocab_size)
    shaped, _ = _nav(tiny_teacher, scorer, seeds, teacher_temperature=0.5, tau=0.5)
    assert torch.equal(shaped.states[:, :3], res.states[:, :3])  # blind until t = 0.5


def test_argmin_keeps_the_lowest_recorded_energy(tiny_teacher):
    scorer = TokenSumScorer(tiny_teacher.config.vocab_size)
    res, cfg = _nav(tiny_teacher, scorer, torch.arange(16))
    assert res.shaped.all()
    assert torch.equal(res.chosen, res.energies.argmin(dim=2))
    # every shaped segment scored B·K candidates in one call at t_{k+1}
    assert scorer.calls == [(48, 0.25), (48, 0.5), (48, 0.75), (48, 1.0)]
    assert res.counters.extra["candidates"] == 16 * 3 * 4
    for k in range(cfg.student_steps):
        kept = scorer.energy(res.states[:, k + 1], 0.0)
        torch.testing.assert_close(kept, res.energies[:, k].min(dim=1).values)


def test_lane_zero_is_the_blind_continuation(tiny_teacher):
    scorer = TokenSumScorer(tiny_teacher.config.vocab_size)
    seeds = torch.arange(12)
    shaped, _ = _nav(tiny_teacher, scorer, seeds)
    blind, _ = _nav(tiny_teacher, None, seeds, candidates=1)
    torch.testing.assert_close(shaped.energies[:, 0, 0], scorer.energy(blind.states[:, 1], 0.25))
    # and the candidates really differ from each other
    assert (shaped.energies[:, 0, 0] != shaped.energies[:, 0, 1]).any()


def test_trajectories_do_not_depend_on_batch_mates(tiny_teacher):
    scorer = TokenSumScorer(tiny_teacher.config.vocab_size)
    both, _ = _nav(tiny_teacher, scorer, torch.tensor([3, 9]))
    alone, _ = _nav(tiny_teacher, scorer, torch.tensor([9]))
    assert torch.equal(both.states[1], alone.states[0])
    assert torch.equal(both.chosen[1], alone.chosen[0])


def test_tau_leaves_early_segments_blind(tiny_teacher):
    scorer = TokenSumScorer(tiny_teacher.config.vocab_size)
    res, _ = _nav(tiny_teacher, scorer, torch.arange(8), tau=0.5)
    assert res.shaped.tolist() == [False, False, True, True]
    assert (res.energies[:, :2] == 0).all() and (res.chosen[:, :2] == 0).all()
    assert (res.energies[:, 2:] != 0).any()


def test_softmax_selection_is_seeded_and_tends_to_argmin_at_low_temperature(tiny_teacher):
    scorer = TokenSumScorer(tiny_teacher.config.vocab_size)
    seeds = torch.arange(32)
    a, _ = _nav(tiny_teacher, scorer, seeds, selection="softmax", temperature=1e-4)
    low = a.energies.min(dim=2, keepdim=True).values
    unique_min = (a.energies == low).sum(dim=2) == 1  # ties are broken at random by softmax
    assert unique_min.float().mean() > 0.5
    assert torch.equal(a.chosen[unique_min], a.energies.argmin(dim=2)[unique_min])
    assert (a.energies.gather(2, a.chosen.unsqueeze(2)) == low).all()
    hot1, _ = _nav(tiny_teacher, scorer, seeds, selection="softmax", temperature=100.0)
    hot2, _ = _nav(tiny_teacher, scorer, seeds, selection="softmax", temperature=100.0)
    assert torch.equal(hot1.chosen, hot2.chosen)
    assert (hot1.chosen != hot1.energies.argmin(dim=2)).any()


def test_bad_navigator_configs(tiny_teacher):
    with pytest.raises(ConfigError, match="not divisible by student_steps"):
        NavigatorConfig(student_steps=8, teacher_steps=100)
    with pytest.raises(ConfigError, match="K=0 must be at least 1"):
        NavigatorConfig(candidates=0)
    with pytest.raises(ConfigError, match=r"tau=1.5 must lie in \[0, 1\]"):
        NavigatorConfig(tau=1.5)
    with pytest.raises(ConfigError, match="needs a compass"):
        _nav(tiny_teacher, None, torch.arange(2))


def _random_token_compass(teacher, student_steps, seed):
    """A small, untrained token-ratio compass for the dilated plan of ``student_steps``, its
    head's weights drawn large enough that its energies differ across candidates."""
    from tsdfm.models.compass import CompassScorer, compass_config
    from tsdfm.models.flow_model import CompassModel

    prov = {"reveal_order": "dilated", "student_steps": student_steps}
    torch.manual_seed(seed)
    model = CompassModel(compass_config(teacher.config, 16, 1, 2, provenance=prov, head="tokens"))
    torch.nn.init.normal_(model.backbone.out.weight, std=0.5)
    return CompassScorer(model, "sha256:test")


def test_token_ratio_compass_selects_through_the_navigator(tiny_teacher):
    """A token-ratio compass behind ``CompassScorer``: every candidate of a midpoint shares the
    kept predecessor, the recorded energies are the compass's energies of the candidates, and
    argmin keeps the lowest."""
    from tsdfm.models.solver import RevealPlan

    S = 4
    scorer = _random_token_compass(tiny_teacher, S, seed=2)
    seeds = torch.arange(16) + 3
    res, _ = _nav(tiny_teacher, scorer, seeds, candidates=4, teacher_steps=8,
                  reveal_order="dilated", shared_reveals=True)  # fmt: skip
    path, mask = tiny_teacher.path, tiny_teacher.config.mask_token_id
    seg = RevealPlan("dilated", S).segment_of(path, tiny_teacher.config.seq_len)
    for k in range(S):
        before, after = res.states[:, k], res.states[:, k + 1]
        # the kept state's predecessor is the state kept at t_k
        assert torch.equal(torch.where(seg == k, mask, after), before)
        kept = res.energies[torch.arange(16), k, res.chosen[:, k]]
        torch.testing.assert_close(scorer.energy(after, (k + 1) / S), kept, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kept, res.energies[:, k].min(1).values)
        assert (res.energies[:, k].std(1) > 0).any()  # siblings are told apart


class PositionScorer(TokenSumScorer):
    """TokenSumScorer with its per-position terms exposed (``per_position``)."""

    per_position = True

    def token_energies(self, x, t):
        w = torch.arange(1, x.shape[1] + 1, dtype=torch.float32)
        return (x % (self.V + 1)).float() * (x != self.V) * w / 100.0


def test_token_softmax_takes_each_position_from_its_best_lane(tiny_teacher):
    """Per-position selection: near T = 0 every position keeps the lane with its lowest
    per-position energy, so the kept state's energy is at most the best whole candidate's and
    below it where lanes disagree at several positions; the kept state only moves the
    segment's positions, and draws are seeded and independent of batch-mates."""
    V, S = tiny_teacher.config.vocab_size, 4
    scorer = PositionScorer(V)
    seeds = torch.arange(24) + 11
    kw = dict(candidates=4, teacher_steps=8, reveal_order="dilated", shared_reveals=True)
    cold, _ = _nav(tiny_teacher, scorer, seeds, selection="token-softmax", temperature=1e-4, **kw)
    whole, _ = _nav(tiny_teacher, scorer, seeds, selection="argmin", **kw)
    for k in range(S):
        kept = scorer.energy(cold.states[:, k + 1], (k + 1) / S)
        assert (kept <= cold.energies[:, k].min(1).values + 1e-5).all()
        torch.testing.assert_close(cold.kept_energies[:, k], kept)
        lane = whole.energies[:, k].gather(1, whole.chosen[:, k, None])[:, 0]
        torch.testing.assert_close(whole.kept_energies[:, k], lane)
    # from the shared source, per-position choice is never worse than whole-candidate choice
    # and better where the lanes disagree at several positions
    first_pos = scorer.energy(cold.states[:, 1], 1 / S)
    first_whole = scorer.energy(whole.states[:, 1], 1 / S)
    assert (first_pos <= first_whole + 1e-5).all() and (first_pos < first_whole - 1e-4).any()
    seg_changes = (cold.states[:, 1:] != cold.states[:, :-1]).sum(2)
    assert (seg_changes <= tiny_teacher.config.seq_len // S).all()
    again, _ = _nav(tiny_teacher, scorer, seeds, selection="token-softmax", temperature=1.0, **kw)
    hot, _ = _nav(tiny_teacher, scorer, seeds, selection="token-softmax", temperature=1.0, **kw)
    assert torch.equal(again.states, hot.states)
    part, _ = _nav(
        tiny_teacher, scorer, seeds[5:9], selection="token-softmax", temperature=1.0, **kw
    )
    assert torch.equal(part.states, hot.states[5:9])
    assert (hot.chosen >= 0).all() and (hot.chosen < 4).all()


def test_token_softmax_needs_shared_positions_and_per_position_energies(tiny_teacher):
    with pytest.raises(ConfigError, match="add --shared-reveals or --reveal-order dilated"):
        NavigatorConfig(selection="token-softmax")
    with pytest.raises(ConfigError, match="needs per-position energies"):
        _nav(tiny_teacher, TokenSumScorer(tiny_teacher.config.vocab_size), torch.arange(2),
             selection="token-softmax", shared_reveals=True)  # fmt: skip


def test_token_ratio_compass_per_position_energies_sum_to_its_energy(tiny_teacher):
    """The token-ratio compass's per-position energies (what ``token-softmax`` reads) sum to
    its energy and are zero outside the scored segment; a pooled compass has none."""
    from tsdfm.models.compass import CompassScorer, compass_config
    from tsdfm.models.flow_model import CompassModel
    from tsdfm.models.scorer import per_position
    from tsdfm.models.solver import RevealPlan

    S = 4
    scorer = _random_token_compass(tiny_teacher, S, seed=3)
    res, _ = _nav(tiny_teacher, scorer, torch.arange(8), candidates=3, teacher_steps=4,
                  reveal_order="dilated", selection="token-softmax")  # fmt: skip
    seg = RevealPlan("dilated", S).segment_of(tiny_teacher.path, tiny_teacher.config.seq_len)
    x = res.states[:, 2]
    te = scorer.token_energies(x, 2 / S)
    torch.testing.assert_close(te.sum(1), scorer.energy(x, 2 / S))
    assert (te[:, seg != 1] == 0).all() and (te[:, seg == 1] != 0).any()
    torch.testing.assert_close(res.kept_energies[:, 1], scorer.energy(x, 2 / S))
    assert per_position(scorer)
    pooled = CompassModel(compass_config(tiny_teacher.config, 16, 1, 2))
    assert not per_position(CompassScorer(pooled, "sha256:pooled"))


class OracleRatio:
    """The exact per-token log-ratio log p(v | x, i) − log q(v | x, i) of the tiny language
    against ``teacher`` (what a perfect token-ratio compass would output)."""

    per_position = True

    def __init__(self, teacher, language):
        self.teacher, self.language = teacher, language
        self.mask = teacher.config.mask_token_id

    def log_ratios(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
        log_q = torch.log_softmax(self.teacher(x, t, torch.zeros_like(t)).double(), -1)
        log_p = torch.log_softmax(self.language.posterior_logits(x, self.mask).double(), -1)
        return (log_p - log_q).float()

    def token_energies(self, x, t):
        return torch.zeros(x.shape, dtype=torch.float32)


def test_tilt_with_the_exact_ratio_samples_the_exact_posterior(tiny_teacher, tiny_language):
    """``selection="tilt"``: log q + (log p − log q) is the language's exact posterior, so the
    tilted trajectories are the exact sampler's with the same random streams (lane 0), and a
    zero ratio leaves the teacher's own trajectories; the kept energy is recorded as the
    segment's one energy."""
    from tsdfm.models.data.synthetic import ExactDenoiser

    S, L = 4, tiny_teacher.config.seq_len
    seeds = torch.arange(64) + 7
    kw = dict(candidates=1, teacher_steps=S, reveal_order="dilated")
    oracle = OracleRatio(tiny_teacher, tiny_language)
    tilted, cfg = _nav(tiny_teacher, oracle, seeds, selection="tilt", **kw)
    assert cfg.shaped_segments() == [True] * S and tilted.shaped.all()
    exact = ExactDenoiser(tiny_language, tiny_teacher.config.mask_token_id)
    want = sample(exact, tiny_teacher.path, seeds, L, S, order="dilated").x_1
    agree = (tilted.states[:, -1] == want).float().mean().item()
    blind, _ = _nav(tiny_teacher, None, seeds, **kw)
    assert agree > 0.99, agree  # float rounding of log p − log q + log q may flip a rare draw
    assert (blind.states[:, -1] != want).any()  # the teacher alone is not the posterior
    assert tilted.energies.shape == (64, S, 1) and (tilted.chosen == 0).all()

    class Zero(OracleRatio):
        def log_ratios(self, x, t):
            return torch.zeros(*x.shape, tiny_teacher.config.vocab_size)

    same, _ = _nav(tiny_teacher, Zero(tiny_teacher, tiny_language), seeds, selection="tilt", **kw)
    assert (same.states == blind.states).float().mean().item() > 0.99


def test_tilt_configs_fail_in_one_line(tiny_teacher):
    with pytest.raises(ConfigError, match=r"use K = 1 \(--k 1\)"):
        NavigatorConfig(selection="tilt", candidates=4, teacher_steps=8, reveal_order="dilated")
    with pytest.raises(ConfigError, match="--teacher-steps 8 --reveal-order dilated"):
        NavigatorConfig(selection="tilt", candidates=1, teacher_steps=64, reveal_order="dilated")
    with pytest.raises(ConfigError, match="--teacher-steps 8 --reveal-order dilated"):
        NavigatorConfig(selection="tilt", candidates=1, teacher_steps=8)
    with pytest.raises(ConfigError, match="per-token log-ratios"):
        _nav(tiny_teacher, TokenSumScorer(tiny_teacher.config.vocab_size), torch.arange(2),
             selection="tilt", candidates=1, teacher_steps=4, reveal_order="dilated")  # fmt: skip
