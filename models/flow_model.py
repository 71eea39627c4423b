"""The networks a checkpoint holds, and its ``config.json`` (:class:`ModelConfig`).

Teacher and student (:class:`FlowModel`): a backbone that predicts p(x_1 | x_t) on a mixture
path. A teacher is conditioned on t (or, under the mask source, on nothing: the posterior
p(x_1 | x_t) of the mask path does not depend on t, which lets the sampler cache evaluations);
a student is additionally conditioned on the step size h (FS-DFM).

Compass (:class:`CompassModel`): the energy network E_θ(x_t, t), the same backbone with a
scalar head (or a per-token log-ratio head, the token-ratio compass); what it estimates and
how it is trained is in ``tsdfm.models.compass``.

Their ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` counterparts (huggingface_hub's
``PyTorchModelHubMixin``) are ``tsdfm.pipeline.hub_models.FlowModel`` and ``CompassModel``:
publishing is the pipeline's, and this layer imports neither it nor the checkpoint loader.

The three built-in roles are registered here, in ``tsdfm.models.roles``, beside their classes,
so a config of any built-in role validates (and a checkpoint of it loads) in a process that
imported nothing else; ``tsdfm.models.roles.register_role`` adds more.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from tsdfm.models.backbone import Backbone, BackboneConfig
from tsdfm.models.errors import ConfigError
from tsdfm.models.path import MixturePath, check_source, parse_scheduler
from tsdfm.models.roles import check_role, register_role
from tsdfm.models.solver import RevealPlan

FORMAT = "tsdfm-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """What ``config.json`` of a checkpoint holds.

    Args:
        role: a registered role (``tsdfm.models.roles``): teacher | student | compass, or
            one added with ``register_role``.
        source: mask | uniform.
        scheduler: scheduler dict, e.g. {"name": "polynomial", "n": 1.0}.
        vocab_size: number of data tokens V (ids 0..V−1).
        special_tokens: e.g. {"mask": V}; under the mask source the mask id must be V.
        seq_len: sequence length L the model was trained on.
        backbone: BackboneConfig.
        data: what the model was trained on, e.g. {"kind": "synthetic", "language":
            "language.json"} (a file inside the checkpoint) or {"kind": "corpus", ...}.
        provenance: free-form facts (training steps, identities of related checkpoints).
    """

    role: str
    source: str
    scheduler: dict
    vocab_size: int
    special_tokens: dict
    seq_len: int
    backbone: BackboneConfig
    data: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_role(self.role)
        check_source(self.source)
        parse_scheduler(self.scheduler)
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size={self.vocab_size} must be at least 2")
        if self.seq_len < 1:
            raise ConfigError(f"seq_len={self.seq_len} must be positive")
        if self.source == "mask" and self.special_tokens.get("mask") != self.vocab_size:
            raise ConfigError(
                f"mask source needs special_tokens.mask == vocab_size ({self.vocab_size}), "
                f"got {self.special_tokens.get('mask')!r}; append [MASK] after the data tokens"
            )
        if self.backbone.vocab_in != self.input_vocab:
            raise ConfigError(
                f"backbone.vocab_in={self.backbone.vocab_in} but the {self.source} source with "
                f"vocab_size={self.vocab_size} needs {self.input_vocab}"
            )
        if self.backbone.max_len < self.seq_len:
            raise ConfigError(
                f"backbone.max_len={self.backbone.max_len} is shorter than seq_len={self.seq_len}"
            )

    @property
    def mask_token_id(self) -> int | None:
        return self.special_tokens.get("mask") if self.source == "mask" else None

    @property
    def input_vocab(self) -> int:
        return self.vocab_size + (1 if self.source == "mask" else 0)

    def path(self) -> MixturePath:
        return MixturePath(
            parse_scheduler(self.scheduler), self.source, self.vocab_size, self.mask_token_id
        )

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            d[f.name] = value.to_dict() if isinstance(value, BackboneConfig) else value
        return d

    @staticmethod
    def from_dict(d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(
                f"config.json holds a JSON {type(d).__name__}, not an object: this directory is "
                "not a tsdfm-pipeline checkpoint"
            )
        if d.get("format") != FORMAT:
            raise ConfigError(
                f"config.json has format {d.get('format')!r}, expected {FORMAT!r}: "
                "this directory is not a tsdfm-pipeline checkpoint"
            )
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(
                f"checkpoint format_version {d['format_version']} is newer than this "
                f"package supports ({FORMAT_VERSION}); upgrade tsdfm-pipeline"
            )
        known = {f.name for f in fields(ModelConfig)}
        missing = [
            k
            for k in ("role", "source", "scheduler", "vocab_size", "seq_len", "backbone")
            if k not in d
        ]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        for key in ("scheduler", "backbone", "special_tokens", "data", "provenance"):
            if key in d and not isinstance(d[key], dict):
                raise ConfigError(
                    f"config.json {key} is a JSON {type(d[key]).__name__}, not an object"
                )
        for key in ("vocab_size", "seq_len"):
            if not isinstance(d[key], int) or isinstance(d[key], bool):
                raise ConfigError(f"config.json {key} is {d[key]!r}, not an integer")
        for key in ("role", "source"):
            if not isinstance(d[key], str):
                raise ConfigError(f"config.json {key} is {d[key]!r}, not a string")
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["backbone"] = BackboneConfig.from_dict(d["backbone"])
        kwargs.setdefault("special_tokens", {})
        return ModelConfig(**kwargs)

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)


class PrecisionMixin:
    """``set_precision("bf16")`` makes ``_autocast(device)`` run bf16 autocast on CUDA; fp32
    (and any CPU device) runs in full precision."""

    precision: str = "fp32"

    def set_precision(self, precision: str):
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision {precision!r}; use 'fp32' or 'bf16'")
        self.precision = precision
        return self

    def _autocast(self, device: torch.device):
        if self.precision == "bf16" and device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


class FlowModel(PrecisionMixin, nn.Module):
    """Denoiser p_θ(x_1 | x_t, t[, h]) for teacher and student roles.

    ``forward`` returns logits over the V data tokens, shape (B, L, V). Under CUDA and
    ``precision="bf16"`` the backbone runs in bf16 autocast; logits are returned in float32.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.backbone.head != "tokens":
            raise ConfigError("a teacher/student backbone needs head='tokens'")
        self.config = config
        self.backbone = Backbone(config.backbone)
        self.precision = "fp32"

    @property
    def time_invariant(self) -> bool:
        b = self.config.backbone
        return self.config.source == "mask" and not b.time_conditioning and not b.step_conditioning

    @property
    def path(self) -> MixturePath:
        return self.config.path()

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        with self._autocast(x_t.device):
            logits = self.backbone(x_t, t, h)
        return logits.float()


def batch_times(t: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A float, 0-d or (B,) time → (B,) float32 on ``device``."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.dim() == 0:
        return t.expand(batch)
    assert t.shape == (batch,), f"t must be a float or a ({batch},) tensor, got {tuple(t.shape)}"
    return t


class CompassModel(PrecisionMixin, nn.Module):
    """E_θ(x_t, t): a time-conditioned transformer (the compass role).

    ``forward`` returns (B,) float32 energies. Under CUDA and ``precision="bf16"`` the
    backbone runs in bf16 autocast, like :class:`FlowModel`. Build its config with
    ``tsdfm.models.compass.compass_config``.

    Two heads. ``scalar`` (the pooled compass): E_θ(x_t, t) = w · mean_i z_i + b.
    ``tokens`` (the token-ratio compass, dilated order only): the backbone reads the
    *predecessor* X of x_t, i.e. x_t with the positions of its last segment k masked again
    (t = t_{k+1} = (k+1)/S of the plan in ``provenance``: ``reveal_order`` "dilated",
    ``student_steps`` S), and outputs per-position, per-token log-ratios
    r_θ(X)[i, v] ≈ log p_data(v | X, i) − log q_teacher(v | X, i) (:meth:`log_ratios`); then

        E_θ(x_t, t) = − Σ_{i in segment k} r_θ(X)[i, x_t^i].

    Candidates of one midpoint share X, so their energies differ only through the tokens they
    revealed: softmax(−E) at temperature 1 is sequential importance resampling with a learned
    per-token ratio (``tsdfm.models.compass``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.role != "compass":
            raise ConfigError(f"a compass needs role='compass', got {config.role!r}")
        head = config.backbone.head
        if head not in ("scalar", "tokens") or not config.backbone.time_conditioning:
            raise ConfigError(
                "a compass backbone needs head='scalar' or 'tokens' and time_conditioning=True; "
                "build its config with tsdfm.models.compass.compass_config"
            )
        if head == "tokens":
            self.plan = _token_compass_plan(config)
        self.config = config
        self.backbone = Backbone(config.backbone)
        self.precision = "fp32"

    def log_ratios(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Token head: (B, L) predecessor states at t_k → (B, L, V) float32 log-ratios r_θ."""
        tt = batch_times(t, x.shape[0], x.device)
        with self._autocast(x.device):
            r = self.backbone(x, tt)
        return r.float()

    def token_energies(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Token head: (B, L) states at segment ends t → (B, L) float32 per-position energies
        −r_θ(X)[i, x_t^i] on the positions i of the last segment (0 elsewhere); they sum to
        :meth:`forward`'s energy. Per-position selection (``selection="token-softmax"``) reads
        them."""
        if self.config.backbone.head != "tokens":
            raise ConfigError("per-position energies need the token-ratio compass (head tokens)")
        S, L = self.plan.segments, x_t.shape[1]
        tt = batch_times(t, x_t.shape[0], x_t.device).double()
        k = (tt * S).round().long() - 1
        if bool(((tt * S - (k + 1)).abs() > 1e-4).any()) or bool((k < 0).any()):
            raise ConfigError(
                f"the token-ratio compass scores states at the segment ends t = 1/{S} … 1 of its "
                f"dilated plan, got t = {tt.unique().tolist()[:4]}; use it with "
                f"--reveal-order dilated --student-steps {S}"
            )
        seg = self.plan.segment_of(self.path, L, x_t.device)
        last = seg.unsqueeze(0) == k.unsqueeze(1)  # (B, L): segment k of each row
        x_prev = torch.where(last, torch.full_like(x_t, self.config.mask_token_id), x_t)
        # siblings share their predecessor: one forward per distinct (X, t_k)
        key = torch.cat([x_prev, k.unsqueeze(1)], dim=1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        r = self.log_ratios(uniq[:, :L], uniq[:, L].double() / S)[inverse]
        tokens = x_t.clamp(0, self.config.vocab_size - 1).unsqueeze(-1)
        picked = r.gather(-1, tokens).squeeze(-1)
        return -(picked * last)

    @property
    def path(self) -> MixturePath:
        return self.config.path()

    def forward(
        self, x_t: torch.Tensor, t: float | torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t: (B, L) int64; t: float or (B,) → (B,) float32 energies (h is ignored)."""
        if self.config.backbone.head == "tokens":
            return self.token_energies(x_t, t).sum(dim=1)
        tt = batch_times(t, x_t.shape[0], x_t.device)
        with self._autocast(x_t.device):
            e = self.backbone(x_t, tt)
        return e.float()


def _token_compass_plan(config: ModelConfig) -> RevealPlan:
    """The dilated plan a token-ratio compass scores in (from its provenance)."""
    prov = config.provenance
    if config.source != "mask" or prov.get("reveal_order") != "dilated":
        raise ConfigError(
            "a token-ratio compass (head='tokens') needs the mask source and provenance "
            "reveal_order='dilated' with student_steps; train it with reveal_order dilated"
        )
    S = prov.get("student_steps")
    if not isinstance(S, int) or isinstance(S, bool) or S < 1:
        raise ConfigError(f"token-ratio compass provenance student_steps={S!r} is not an integer")
    return RevealPlan("dilated", S)


register_role("teacher", FlowModel)
register_role("student", FlowModel)
register_role("compass", CompassModel)


def teacher_config(
    vocab_size: int,
    seq_len: int,
    source: str = "mask",
    scheduler: str | dict = "linear",
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    time_conditioning: bool | None = None,
    data: dict | None = None,
    special_tokens: dict | None = None,
) -> ModelConfig:
    """A teacher config; under the mask source time conditioning is off by default (exact cache)."""
    check_source(source)
    if time_conditioning is None:
        time_conditioning = source != "mask"
    special = dict(special_tokens or {})
    if source == "mask":
        special["mask"] = vocab_size
    backbone = BackboneConfig(
        vocab_in=vocab_size + (1 if source == "mask" else 0),
        vocab_out=vocab_size,
        max_len=seq_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        cond_dim=d_model,
        time_conditioning=time_conditioning,
    )
    return ModelConfig(
        role="teacher",
        source=source,
        scheduler=parse_scheduler(scheduler).to_dict(),
        vocab_size=vocab_size,
        special_tokens=special,
        seq_len=seq_len,
        backbone=backbone,
        data=data or {},
    )


def student_from_teacher(teacher: FlowModel) -> FlowModel:
    """A step-size-conditioned student initialised from the teacher's weights.

    The new step-size branch is zero-initialised, so the student starts as the teacher.
    Time conditioning is switched on as well (a few-step student's update depends on t); its
    output layer starts at zero for the same reason.
    """
    tcfg = teacher.config
    bcfg = replace(tcfg.backbone, step_conditioning=True, time_conditioning=True)
    cfg = replace(tcfg, role="student", backbone=bcfg)
    student = FlowModel(cfg)
    _, unexpected = student.backbone.load_state_dict(teacher.backbone.state_dict(), strict=False)
    assert not unexpected, unexpected
    if not tcfg.backbone.time_conditioning:
        nn.init.zeros_(student.backbone.time_emb.mlp[-1].weight)
        nn.init.zeros_(student.backbone.time_emb.mlp[-1].bias)
    return student
