"""Shared fixtures: tiny languages and models that build in milliseconds."""

from __future__ import annotations

import itertools

import pytest
import torch

from tsdfm.models.data.synthetic import LanguageConfig, SyntheticLanguage
from tsdfm.models.flow_model import FlowModel, teacher_config

# Tiny models run fastest on one thread, and CI has only two cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_language() -> SyntheticLanguage:
    return SyntheticLanguage.generate(
        LanguageConfig(vocab_size=12, num_states=4, branching=3, smoothing=0.05, seq_len=8, seed=3)
    )


@pytest.fixture()
def tiny_teacher(tiny_language) -> FlowModel:
    torch.manual_seed(0)  # parameter init only; every sampler draw is counter-based
    cfg = teacher_config(
        tiny_language.vocab_size,
        tiny_language.seq_len,
        d_model=32,
        n_layers=2,
        n_heads=2,
        data={"kind": "synthetic", "language": "language.json"},
    )
    return FlowModel(cfg).eval()


class JointOracle:
    """The exact denoiser p(x_1 | x_t) of a known joint distribution over short sequences.

    Under the mask source the posterior given x_t is the data distribution conditioned on the
    revealed tokens; under the uniform source it is the exact mixture-path posterior at time t.
    """

    def __init__(self, joint: torch.Tensor, source: str, kappa=lambda t: t):
        self.joint = joint.double() / joint.sum()  # shape (V,)*L
        self.V = joint.shape[0]
        self.L = joint.dim()
        self.source = source
        self.kappa = kappa
        self.time_invariant = source == "mask"
        self.seqs = torch.tensor(list(itertools.product(range(self.V), repeat=self.L)))
        self.probs = self.joint.flatten()
        self.calls = 0
        self.h_seen: list[float] = []

    def __call__(self, x_t, t, h):
        self.calls += 1
        self.h_seen.extend(h.tolist())
        same = self.seqs.unsqueeze(0) == x_t.unsqueeze(1)  # (B, S, L)
        if self.source == "mask":
            revealed = (x_t != self.V).unsqueeze(1)
            w = self.probs * (same | ~revealed).all(-1)
        else:
            k = self.kappa(t.double()).view(-1, 1, 1)
            lik = torch.where(same, k + (1 - k) / self.V, (1 - k) / self.V)
            w = self.probs * lik.prod(-1)
        w = w / w.sum(1, keepdim=True)
        onehot = torch.nn.functional.one_hot(self.seqs, self.V).double()  # (S, L, V)
        out = torch.einsum("bs,slv->blv", w, onehot)
        return torch.log(out.clamp_min(1e-300)).float()


@pytest.fixture()
def oracle_factory():
    return JointOracle


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session: 2 CPUs and 2 fake GPUs."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to another cluster running on this machine
            num_cpus=2,
            num_gpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def saved_tiny_teacher(tmp_path_factory, tiny_language):
    """The tiny teacher saved as a checkpoint directory (random weights, fixed seed)."""
    import json

    from tsdfm.models.checkpoint import save_checkpoint
    from tsdfm.models.train.common import seeded

    cfg = teacher_config(
        tiny_language.vocab_size,
        tiny_language.seq_len,
        d_model=32,
        n_layers=2,
        n_heads=2,
        data={"kind": "synthetic", "language": "language.json"},
    )
    with seeded(0):
        model = FlowModel(cfg).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)  # a peaked, non-uniform denoiser
    d = tmp_path_factory.mktemp("ckpt") / "teacher"
    save_checkpoint(
        d, model, tiny_language.tokenizer(), {"language.json": json.dumps(tiny_language.to_dict())}
    )
    return d


@pytest.fixture(scope="session")
def saved_tiny_compass(tmp_path_factory, saved_tiny_teacher, tiny_language):
    """A randomly initialised compass for the tiny teacher, saved with its provenance."""
    from tsdfm.models.checkpoint import load_checkpoint, save_checkpoint
    from tsdfm.models.compass import compass_config
    from tsdfm.models.flow_model import CompassModel
    from tsdfm.models.train.common import seeded

    teacher = load_checkpoint(saved_tiny_teacher)
    cfg = compass_config(
        teacher.config,
        d_model=16,
        n_layers=1,
        n_heads=2,
        provenance={"teacher_identity": teacher.identity},
    )
    with seeded(1):
        model = CompassModel(cfg).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
    d = tmp_path_factory.mktemp("ckpt") / "compass"
    save_checkpoint(d, model, tiny_language.tokenizer())
    return d


def _build_tiny_dataset(root, teacher, compass, candidates):
    from tsdfm.models.navigator import NavigatorConfig
    from tsdfm.pipeline.build import run_build
    from tsdfm.pipeline.config import BuildConfig

    nav = NavigatorConfig(student_steps=4, teacher_steps=32, candidates=candidates)
    cfg = BuildConfig(
        teacher=str(teacher),
        compass=None if compass is None else str(compass),
        shards=3,
        trajectories_per_shard=8,
        batch_size=8,
        navigator=nav,
        seed=3,
    )
    run_build(cfg, str(root), device="cpu", num_workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_blind_dataset(tmp_path_factory, ray_cluster, saved_tiny_teacher):
    """A committed K = 1 dataset of the tiny teacher: 3 shards x 8 trajectories, S=4, N=32.

    Session-scoped and shared: copy it (shutil.copytree) before modifying anything in it.
    """
    return _build_tiny_dataset(
        tmp_path_factory.mktemp("data") / "blind", saved_tiny_teacher, None, 1
    )


@pytest.fixture(scope="session")
def tiny_shaped_dataset(tmp_path_factory, ray_cluster, saved_tiny_teacher, saved_tiny_compass):
    """A committed K = 3 dataset of the tiny teacher and compass (same plan as the blind one).

    Session-scoped and shared: copy it (shutil.copytree) before modifying anything in it.
    """
    return _build_tiny_dataset(
        tmp_path_factory.mktemp("data") / "shaped", saved_tiny_teacher, saved_tiny_compass, 3
    )
