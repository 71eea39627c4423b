import torch

from tsdfm.models.rng import CounterRNG, Stream, categorical, hash32, trajectory_seed


def test_hash32_matches_reference_uint32_arithmetic():
    def ref(x: int) -> int:
        m = 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        x ^= x >> 16
        return x

    xs = [0, 1, 2, 12345, 0xDEADBEEF, 0xFFFFFFFF, 2**31]
    got = hash32(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [ref(x) for x in xs]


def test_uniforms_are_uniform_and_independent():
    rng = CounterRNG(torch.arange(512))
    u = rng.uniform(step=3, stream=Stream.DRAW, n=256)
    assert u.dtype == torch.float64 and u.shape == (512, 256)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005  # sd of the mean ≈ 0.0008
    assert abs(u.var().item() - 1 / 12) < 0.002
    v = rng.uniform(step=4, stream=Stream.DRAW, n=256)
    w = rng.uniform(step=3, stream=Stream.JUMP, n=256)
    for other in (v, w):
        corr = torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1]
        assert abs(corr.item()) < 0.01
    # neighbouring positions and rows are uncorrelated too
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]) < 0.01


def test_uniforms_do_not_depend_on_batching_and_lanes_differ():
    seeds = torch.tensor([5, 17, 2**40 + 3, 99])
    full = CounterRNG(seeds).uniform(7, Stream.JUMP, 10)
    part = CounterRNG(seeds).index(torch.tensor([2, 0])).uniform(7, Stream.JUMP, 10)
    assert torch.equal(part, full[[2, 0]])
    alone = CounterRNG(seeds[2:3]).uniform(7, Stream.JUMP, 10)
    assert torch.equal(alone[0], full[2])
    lane1 = CounterRNG(seeds, lane=1).uniform(7, Stream.JUMP, 10)
    assert not torch.isclose(lane1, full).any()


def test_categorical_frequencies_and_zero_probability_tokens():
    p = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    n = 200_000
    u = CounterRNG(torch.arange(n)).uniform(0, Stream.DRAW, 1)[:, 0]
    idx = categorical(p.cumsum(0).expand(n, -1).contiguous(), u)
    freq = torch.bincount(idx, minlength=5).double() / n
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, p, atol=0.005)
    # u at the very top of [0, 1) still returns a token of positive probability
    top = torch.tensor([1 - 2**-53], dtype=torch.float64)
    assert categorical(p.cumsum(0).unsqueeze(0), top).item() == 3


def test_trajectory_seed_is_seed_times_2_32_plus_index_for_ints_and_tensors():
    assert trajectory_seed(0, 7) == 7
    assert trajectory_seed(3, 5) == 3 * 4294967296 + 5
    ids = torch.arange(4, dtype=torch.long)
    seeds = trajectory_seed(2**30 - 1, ids)
    assert seeds.dtype == torch.long
    assert seeds.tolist() == [(2**30 - 1) * 2**32 + i for i in range(4)]
