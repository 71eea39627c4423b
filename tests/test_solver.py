import pytest
import torch

from tsdfm.models.path import MixturePath, PolynomialScheduler
from tsdfm.models.rng import CounterRNG
from tsdfm.models.solver import (
    TemperedDenoiser,
    jump_probability,
    jump_step,
    rollout,
    sample,
    uniform_grid,
)


def _path(source, V, n=1.0):
    return MixturePath(PolynomialScheduler(n), source, V, V if source == "mask" else None)


def _joint():
    # two tokens over V=3 with strong dependence: mostly equal neighbours
    j = torch.tensor([[0.30, 0.02, 0.01], [0.02, 0.25, 0.03], [0.01, 0.06, 0.30]])
    return j / j.sum()


def _tv(samples, joint):
    V = joint.shape[0]
    idx = samples[:, 0] * V + samples[:, 1]
    emp = torch.bincount(idx, minlength=V * V).double() / samples.shape[0]
    return 0.5 * (emp - joint.flatten()).abs().sum().item()


@pytest.mark.parametrize("n", [1.0, 2.0])
def test_jump_probability_is_exact_mixture_rate(n):
    path = _path("mask", 4, n)
    k = lambda t: t**n  # noqa: E731
    for t, h in [(0.0, 0.25), (0.3, 0.1), (0.9, 0.05)]:
        assert jump_probability(path, t, h) == pytest.approx((k(t + h) - k(t)) / (1 - k(t)))
    assert jump_probability(path, 0.75, 0.25) == 1.0
    # composing two half steps gives the same survival as one full step
    q1 = jump_probability(path, 0.2, 0.3)
    q2 = jump_probability(path, 0.5, 0.3)
    q = jump_probability(path, 0.2, 0.6)
    assert (1 - q1) * (1 - q2) == pytest.approx(1 - q)


def test_jump_step_moves_masked_positions_with_probability_q():
    V, B, L = 5, 4000, 32
    x = torch.full((B, L), V)
    x[:, ::2] = 1  # half the positions already revealed
    logits = torch.zeros(B, L, V)
    q = 0.3
    out = jump_step(x, logits, q, CounterRNG(torch.arange(B)), step=0, mask_token_id=V)
    moved = out[:, 1::2] != V
    assert abs(moved.double().mean().item() - q) < 0.01  # sd ≈ 0.0036
    assert torch.equal(out[:, ::2], x[:, ::2])  # revealed tokens never change
    freq = torch.bincount(out[:, 1::2][moved], minlength=V).double()
    assert torch.allclose(
        freq / freq.sum(), torch.full((V,), 1 / V, dtype=torch.float64), atol=0.01
    )


def test_mask_source_reveals_each_position_once_and_ends_without_masks(tiny_teacher):
    path = tiny_teacher.path
    V, L, B, N = path.vocab_size, 8, 64, 40
    rng = CounterRNG(torch.arange(B))
    x = path.sample_source((B, L), rng)
    grid = uniform_grid(N)
    history = [x]
    for j in range(N):
        x, _ = rollout(tiny_teacher, path, x, grid[j : j + 2], rng, step_offset=j)
        history.append(x)
    states = torch.stack(history)  # (N+1, B, L)
    revealed = states != V
    # once revealed, a position keeps its token to the end
    first = revealed.double().argmax(0)
    for b in range(B):
        for i in range(L):
            k = first[b, i]
            assert (states[k:, b, i] == states[-1, b, i]).all()
    assert (states[-1] != V).all() and (states[-1] < V).all()
    assert not revealed[0].any()


def test_same_seed_same_samples_different_seed_differs(tiny_teacher):
    path = tiny_teacher.path
    a = sample(tiny_teacher, path, torch.arange(32), 8, 16).x_1
    b = sample(tiny_teacher, path, torch.arange(32), 8, 16).x_1
    c = sample(tiny_teacher, path, torch.arange(32) + 1000, 8, 16).x_1
    assert torch.equal(a, b)
    assert (a != c).any(dim=1).float().mean() > 0.9
    # a sample does not depend on its batch-mates
    d = sample(tiny_teacher, path, torch.tensor([7, 3]), 8, 16).x_1
    assert torch.equal(d, a[[7, 3]])


def test_segmented_rollout_equals_single_rollout(tiny_teacher):
    path = tiny_teacher.path
    B, L, N = 16, 8, 32
    seeds = torch.arange(B) + 11
    full = sample(tiny_teacher, path, seeds, L, N).x_1
    rng = CounterRNG(seeds)
    x = path.sample_source((B, L), rng)
    grid = uniform_grid(N)
    cache = None
    for k in range(4):
        x, cache = rollout(tiny_teacher, path, x, grid[8 * k : 8 * k + 9], rng, 8 * k, cache)
    assert torch.equal(x, full)


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_many_steps_recover_the_joint_and_one_step_gives_product_of_marginals(
    source, oracle_factory
):
    joint = _joint()
    V = joint.shape[0]
    oracle = oracle_factory(joint, source)
    path = _path(source, V)
    n = 20000
    many = sample(oracle, path, torch.arange(n), 2, 64).x_1
    assert _tv(many, joint) < 0.025
    one = sample(oracle_factory(joint, source), path, torch.arange(n), 2, 1).x_1
    product = torch.outer(joint.sum(1), joint.sum(0))
    assert _tv(one, product) < 0.025
    assert _tv(one, joint) > 0.2  # one parallel step visibly breaks the dependence


def test_step_size_sampler_with_h_equal_1_over_n_is_the_teacher_sampler(oracle_factory):
    joint = _joint()
    path = _path("uniform", 3)
    N = 16
    teacher = oracle_factory(joint, "uniform")
    student = oracle_factory(joint, "uniform")
    a = sample(teacher, path, torch.arange(4000), 2, N).x_1
    b = sample(student, path, torch.arange(4000), 2, N, times=uniform_grid(N)).x_1
    assert torch.equal(a, b)
    assert student.h_seen and all(abs(h - 1 / N) < 1e-7 for h in student.h_seen)
    # in distribution as well: independent seeds give statistically equal joints
    c = sample(student, path, torch.arange(4000) + 10**6, 2, N, times=uniform_grid(N)).x_1
    assert abs(_tv(a, joint) - _tv(c, joint)) < 0.03 and _tv(c, joint) < 0.05


def test_cache_is_exact_and_saves_forward_passes(oracle_factory):
    joint = _joint()
    path = _path("mask", 3)
    cached = oracle_factory(joint, "mask")
    uncached = oracle_factory(joint, "mask")
    uncached.time_invariant = False
    a = sample(cached, path, torch.arange(500), 2, 128)
    b = sample(uncached, path, torch.arange(500), 2, 128)
    assert torch.equal(a.x_1, b.x_1)
    assert b.counters.row_forwards == 500 * 128
    assert a.counters.row_forwards <= 500 * 3  # initial pass + at most one per reveal


# --------------------------------------------------------------------------- temperature
# the bundled teacher's tokens for seeds 5·2^32 + (0..3), 32 steps, drawn by the sampler as it
# was before temperature existed: T = 1 must keep reproducing them bit for bit
BUNDLED_32_STEP_SHA256 = "4bc85a547d1cdc86d064b2f51599ce328f40e4390a62d2e2e33183e505e5041a"


@pytest.fixture(scope="module")
def bundled_teacher():
    from tsdfm.models.checkpoint import bundled_path, load_checkpoint

    return load_checkpoint(str(bundled_path("teacher")))


def test_temperature_one_is_the_old_sampler_bit_for_bit(bundled_teacher):
    import hashlib

    model, mc = bundled_teacher.model.eval(), bundled_teacher.config
    seeds = torch.arange(4) + 5 * 2**32
    x = sample(model, mc.path(), seeds, mc.seq_len, 32, temperature=1.0).x_1
    assert hashlib.sha256(x.numpy().tobytes()).hexdigest() == BUNDLED_32_STEP_SHA256
    assert torch.equal(x, sample(model, mc.path(), seeds, mc.seq_len, 32).x_1)
    # the wrapper at T = 1 hands back the model's own logits
    x_t = torch.full((2, mc.seq_len), mc.mask_token_id)
    t = torch.zeros(2)
    assert torch.equal(TemperedDenoiser(model, 1.0)(x_t, t, t), model(x_t, t, t))


def test_lower_temperature_gives_lower_unigram_entropy(bundled_teacher):
    from tsdfm.models.eval.metrics import unigram_entropy

    model, mc = bundled_teacher.model.eval(), bundled_teacher.config
    seeds = torch.arange(24)
    entropy = {
        T: unigram_entropy(
            sample(model, mc.path(), seeds, mc.seq_len, 16, temperature=T).x_1, mc.input_vocab
        ).mean()
        for T in (0.5, 1.0)
    }
    assert entropy[0.5] < entropy[1.0] - 0.1


def test_tempered_draws_follow_softmax_of_logits_over_t():
    V, B, T = 4, 20000, 0.5
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1])).expand(B, 1, V)

    class Fixed:
        time_invariant = True

        def __call__(self, x_t, t, h):
            return logits[: x_t.shape[0]]

    x = sample(TemperedDenoiser(Fixed(), T), _path("mask", V), torch.arange(B), 1, 1).x_1
    freq = torch.bincount(x[:, 0], minlength=V).double() / B
    expected = torch.softmax(logits[0, 0].double() / T, dim=0)  # ∝ p^2: 16:9:4:1 / 30
    assert torch.allclose(freq, expected, atol=0.01)  # sd ≤ 0.0035


def test_cache_works_through_the_wrapper(oracle_factory):
    joint = _joint()
    path = _path("mask", 3)
    cached = TemperedDenoiser(oracle_factory(joint, "mask"), 0.7)
    uncached = TemperedDenoiser(oracle_factory(joint, "mask"), 0.7)
    uncached.time_invariant = False
    a = sample(cached, path, torch.arange(500), 2, 128)
    b = sample(uncached, path, torch.arange(500), 2, 128)
    assert cached.time_invariant
    assert torch.equal(a.x_1, b.x_1)
    assert a.counters.row_forwards <= 500 * 3 < b.counters.row_forwards == 500 * 128
    # through sample(temperature=...) as well: the same draws as the explicit wrapper
    c = sample(oracle_factory(joint, "mask"), path, torch.arange(500), 2, 128, temperature=0.7)
    assert torch.equal(c.x_1, a.x_1) and c.counters.row_forwards == a.counters.row_forwards


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_a_config_error_naming_the_fix(tiny_teacher, bad):
    from tsdfm.models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"temperature=.* must be a finite number > 0"):
        sample(tiny_teacher, tiny_teacher.path, torch.arange(2), 8, 4, temperature=bad)
    with pytest.raises(ConfigError, match="must be a finite number > 0"):
        TemperedDenoiser(tiny_teacher, bad)


def test_compass_training_keeps_its_tempered_denoiser():
    from tsdfm.models.train import compass

    assert compass.TemperedDenoiser is TemperedDenoiser


def test_draws_in_chunks_are_the_draws_of_one_pass(monkeypatch):
    """draw_tokens splits the positions into chunks; every draw and log q stays the same."""
    import tsdfm.models.solver as solver
    from tsdfm.models.rng import categorical

    B, L, V = 3, 40, 37
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g) * 3
    rows, cols = torch.meshgrid(torch.arange(B), torch.arange(L), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    u = torch.rand(B * L, generator=g, dtype=torch.float64)
    p = torch.softmax(logits[rows, cols].double(), dim=-1)
    one_pass = categorical(p.cumsum(-1), u)
    log_p = torch.log_softmax(logits[rows, cols].double(), -1).gather(1, one_pass[:, None])[:, 0]
    for elements in (V, 5 * V + 3, 1 << 20):  # 1 position, 5 positions, everything at once
        monkeypatch.setattr(solver, "DRAW_CHUNK_ELEMENTS", elements)
        assert torch.equal(solver.draw_tokens(logits, rows, cols, u), one_pass)
        assert torch.equal(solver.token_log_probs(logits, rows, cols, one_pass), log_p)


def test_a_rollout_leaves_the_callers_cache_as_it_was(tiny_teacher):
    """The rollout writes re-evaluated rows into logits it allocated itself, never into the
    cache it was given (a caller may roll the same state again from it)."""
    path = tiny_teacher.path
    rng = CounterRNG(torch.arange(6))
    grid = uniform_grid(64)
    x = path.sample_source((6, 8), rng)
    x, cache = rollout(tiny_teacher, path, x, grid[:9], rng, 0)
    before = cache.logits.clone()
    again = [rollout(tiny_teacher, path, x, grid[8:], rng, 8, cache)[0] for _ in range(2)]
    assert torch.equal(cache.logits, before)
    assert torch.equal(again[0], again[1])
