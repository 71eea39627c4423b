"""The energy compass and the other scorers the navigator selects candidates with.

A scorer (``tsdfm.models.scorer.Scorer``) maps a batch of states x_t at time t to energies,
lower = more coherent:

    E: (x_t ∈ V^{B×L}, t ∈ [0, 1]^B) ↦ e ∈ ℝ^B

The pooled compass is a small time-conditioned bidirectional transformer with a scalar head,
E_θ(x_t, t) = w · mean_i z_i(x_t, t) + b, trained by generation-aware noise-contrastive
estimation (``tsdfm.models.train.compass``): real sequences noised to t along the path get low
energy, the teacher's own trajectory states at the same t get high energy. Its logistic
classifier is σ(−E_θ), so with positives and negatives in equal numbers E_θ estimates
log p_teacher,t(x_t) − log p_data,t(x_t).

The token-ratio compass (``head="tokens"``, dilated order only) ranks the K siblings of a
midpoint instead: they share one predecessor X (the state at t_k) and differ only in the tokens
of segment k, so a network that reads X once and outputs per-position, per-token log-ratios
r_θ(X)[i, v] ≈ log p_data(v | X, i) − log q_teacher(v | X, i) gives every sibling
E = −Σ_{i in segment k} r_θ(X)[i, x^i]. It is trained densely at every masked position of real
contexts X (``tsdfm.models.train.compass.token_ratio_loss``: the cross-entropy of the real token
under log q + r, whose optimum is the log-ratio up to a per-position constant that siblings
share).

The network E_θ is ``tsdfm.models.flow_model.CompassModel`` (defined beside the other roles'
networks, so a compass checkpoint loads without this module); the protocol it stands behind is
``tsdfm.models.scorer.Scorer``. Any other model can stand behind the same interface;
:class:`CausalLMScorer` scores the teacher's denoised guess of each state with a local causal
language model, :class:`ExactScorer` with the synthetic language's own likelihood.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsdfm.models.backbone import BackboneConfig
from tsdfm.models.causal_lm import (
    check_lm_directory,
    document_tokens,
    load_causal_lm,
    scorer_identity,
    sequence_nll,
)
from tsdfm.models.causal_lm import lm_identity as causal_lm_identity
from tsdfm.models.checkpoint import Checkpoint, load_checkpoint
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.flow_model import CompassModel, FlowModel, ModelConfig, batch_times
from tsdfm.models.hashing import sha256_json


class TeacherMismatchWarning(UserWarning):
    """A compass or negative source saw another teacher's states, and the user allowed it."""


def compass_config(
    teacher: ModelConfig,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    provenance: dict | None = None,
    head: str = "scalar",
) -> ModelConfig:
    """The config of a compass for ``teacher``'s states.

    Vocabulary, special tokens, source, scheduler, sequence length and data are the teacher's,
    so the compass reads exactly the states the teacher produces. ``head``: "scalar" (the
    pooled compass) or "tokens" (the token-ratio compass; its provenance must name the
    dilated plan, ``reveal_order`` and ``student_steps``).
    """
    backbone = BackboneConfig(
        vocab_in=teacher.input_vocab,
        vocab_out=teacher.vocab_size,
        max_len=teacher.seq_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        mlp_ratio=mlp_ratio,
        cond_dim=d_model,
        time_conditioning=True,
        step_conditioning=False,
        dropout=dropout,
        head=head,
    )
    return replace(
        teacher,
        role="compass",
        special_tokens=dict(teacher.special_tokens),
        backbone=backbone,
        data=dict(teacher.data),
        provenance=dict(provenance or {}),
    )


def check_compatible(
    compass_cfg: ModelConfig, teacher_cfg: ModelConfig, compass_name: str, teacher_name: str
) -> None:
    """Refuse a compass that cannot read the teacher's states (raises CheckpointError).

    Vocabulary size, special token ids and source must be equal, and the compass must accept
    sequences of the teacher's length.
    """
    problems = []
    if compass_cfg.vocab_size != teacher_cfg.vocab_size:
        problems.append(f"vocabulary {compass_cfg.vocab_size} vs {teacher_cfg.vocab_size} tokens")
    if compass_cfg.special_tokens != teacher_cfg.special_tokens:
        problems.append(
            f"special tokens {compass_cfg.special_tokens} vs {teacher_cfg.special_tokens}"
        )
    if compass_cfg.source != teacher_cfg.source:
        problems.append(f"source {compass_cfg.source} vs {teacher_cfg.source}")
    if compass_cfg.backbone.max_len < teacher_cfg.seq_len:
        problems.append(
            f"max length {compass_cfg.backbone.max_len} < sequence length {teacher_cfg.seq_len}"
        )
    if problems:
        raise CheckpointError(
            f"compass {compass_name} does not fit teacher {teacher_name} ({'; '.join(problems)}); "
            "train a compass for this teacher with `tsdfm-pipeline compass train --teacher ...`"
        )


def check_teacher_identity(
    seen: str | None,
    teacher_identity: str,
    what: str,
    teacher_name: str,
    allow_teacher_mismatch: bool = False,
) -> None:
    """Refuse energies learned from another teacher's states, unless explicitly allowed.

    Args:
        seen: identity of the teacher whose states ``what`` was built from (None = unknown).
        teacher_identity: identity of the teacher in use.
        what: e.g. "compass runs/compass/final" or "negatives runs/neg".
        teacher_name: how the user named the teacher.
        allow_teacher_mismatch: warn (TeacherMismatchWarning) instead of raising.
    """
    if seen == teacher_identity:
        return
    seen_text = "an unknown teacher" if seen is None else f"teacher {seen[:19]}"
    message = (
        f"{what} was built from {seen_text}, not from teacher {teacher_name} "
        f"({teacher_identity[:19]})"
    )
    if allow_teacher_mismatch:
        warnings.warn(message + "; continuing as allowed", TeacherMismatchWarning, stacklevel=3)
        return
    raise CheckpointError(
        message + "; use the matching teacher, train a compass for this one, or pass "
        "--allow-teacher-mismatch"
    )


def check_compass_for_teacher(
    compass: Checkpoint, teacher: Checkpoint, allow_teacher_mismatch: bool = False
) -> None:
    """Both checks a compass must pass before it scores ``teacher``'s states: it reads them
    (:func:`check_compatible`) and it learned from them (:func:`check_teacher_identity`)."""
    check_compatible(compass.config, teacher.config, compass.spec, teacher.spec)
    check_teacher_identity(
        compass.config.provenance.get("teacher_identity"),
        teacher.identity,
        f"compass {compass.spec}",
        teacher.spec,
        allow_teacher_mismatch,
    )


def _follow_device(model: nn.Module, device: torch.device) -> None:
    """Move ``model`` to ``device`` if its weights live elsewhere (the input decides)."""
    param = next(model.parameters(), None)
    if param is not None and param.device != device:
        model.to(device)


class CompassScorer:
    """A loaded compass behind the :class:`tsdfm.models.scorer.Scorer` interface.

    Args:
        model: the compass.
        identity: its checkpoint identity (``sha256:...``).
        teacher_identity: identity of the teacher whose negatives it saw (from provenance).
        name: label for reports.
    """

    def __init__(
        self,
        model: CompassModel,
        identity: str,
        teacher_identity: str | None = None,
        name: str = "compass",
    ):
        self.model = model.eval()
        self.identity = identity
        self.teacher_identity = teacher_identity
        self.name = name
        self.config = model.config

    @staticmethod
    def from_checkpoint(ckpt: Checkpoint) -> CompassScorer:
        return CompassScorer(
            ckpt.model, ckpt.identity, ckpt.config.provenance.get("teacher_identity")
        )

    @torch.no_grad()
    def energy(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """(B, L) states at t → (B,) float32 energies on x_t's device."""
        _follow_device(self.model, x_t.device)
        return self.model(x_t, t)

    @property
    def per_position(self) -> bool:
        """Whether it has per-position energies (:meth:`token_energies`): the token head."""
        return self.config.backbone.head == "tokens"

    @torch.no_grad()
    def log_ratios(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """(B, L) predecessor states at t_k → (B, L, V) float32 log-ratios r_θ (token head
        only): what ``selection="tilt"`` adds to the teacher's logits."""
        if not self.per_position:
            raise ConfigError("log-ratios need the token-ratio compass (head tokens)")
        _follow_device(self.model, x.device)
        return self.model.log_ratios(x, t)

    @torch.no_grad()
    def token_energies(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """(B, L) states at t → (B, L) float32 per-position energies (token head only); they
        sum to :meth:`energy`."""
        _follow_device(self.model, x_t.device)
        return self.model.token_energies(x_t, t)


EXACT_SCORERS = {"exact": "likelihood", "exact-ratio": "ratio"}


class ExactScorer:
    """The synthetic language's own likelihood as a scorer: the oracle no compass can beat.

    ``likelihood``: E(x_t) = −log p(x_visible), the exact marginal likelihood of the revealed
    tokens (``SyntheticLanguage.log_marginal``). Between candidates that share x_{t_k} and the
    reveal pattern, argmin keeps the likeliest joint draw (mode-seeking).

    ``ratio``: E(x_t) = log q − log p(x_visible), with log q the teacher's log-probability of
    the tokens the candidate drew in the segment (the navigator passes it: ``uses_proposal``).
    Candidates share x_{t_k}, so softmax(−E) ∝ p(x_R | x_{t_k}) / q(x_R | x_{t_k}): importance
    resampling toward the language itself, the ceiling of density-ratio selection.

    Only for teachers of the synthetic language (``--compass exact`` or ``exact-ratio``).
    """

    def __init__(self, language, mask_token_id: int, mode: str = "ratio"):
        if mode not in EXACT_SCORERS.values():
            raise ConfigError(f"unknown exact scorer mode {mode!r}; use likelihood or ratio")
        self.language = language
        self.mask_token_id = int(mask_token_id)
        self.mode = mode
        self.uses_proposal = mode == "ratio"
        self.name = "exact" if mode == "likelihood" else "exact-ratio"
        self.identity = f"{self.name}:" + sha256_json(
            language.to_dict(), "the language", ConfigError
        )

    @staticmethod
    def for_teacher(spec: str, teacher: Checkpoint) -> ExactScorer:
        """The exact scorer named ``spec`` ("exact" or "exact-ratio") for a synthetic teacher."""
        from tsdfm.models.data.sources import load_language

        if teacher.config.data.get("kind") != "synthetic" or teacher.config.source != "mask":
            raise ConfigError(
                f"--compass {spec} scores with the synthetic language's exact likelihood, but "
                f"teacher {teacher.spec} is not a mask-source teacher of the synthetic language; "
                "pass a compass checkpoint"
            )
        language = load_language(teacher.directory, teacher.config.data)
        return ExactScorer(language, teacher.config.mask_token_id, EXACT_SCORERS[spec])

    @torch.no_grad()
    def energy(
        self, x_t: torch.Tensor, t: float | torch.Tensor, log_q: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) states → (B,) float32 energies on x_t's device (see the class docstring)."""
        e = -self.language.log_marginal(x_t.cpu(), self.mask_token_id)
        if self.mode == "ratio":
            if log_q is None:
                raise ConfigError("the exact-ratio scorer needs the proposal log q of each state")
            e = e + log_q.cpu().double()
        return e.float().to(x_t.device)


def load_compass(spec: str | Path, device: str | torch.device = "cpu") -> CompassScorer:
    """Load a compass checkpoint (directory or ``org/name[@rev]``) as a scorer."""
    return CompassScorer.from_checkpoint(load_checkpoint(spec, device, role="compass"))


class CausalLMScorer:
    """Energy = mean token NLL of the teacher's denoised guess under a causal language model.

    For each state x_t the teacher's guess x̂_1 fills every position that may still be noise
    with argmax p_θ(x_1 | x_t) (under the mask source the masked positions; revealed tokens
    are final and kept; under the uniform source every position). x̂_1 is decoded with the
    teacher's tokenizer, retokenized with the LM's tokenizer into y_1..y_T, and

        E(x_t, t) = −(1/T) Σ_{j=1..T} log p_LM(y_j | y_0, y_<j)

    with y_0 the token that starts a document for the LM
    (``tsdfm.models.causal_lm.document_tokens``:
    ``<|endoftext|>`` when it has one, else BOS, else EOS; an empty decoding is scored as the
    single token y_1 = y_0). Everything is batched: one teacher
    forward and one LM forward per call (padding on the right, masked out of the mean).

    Args:
        lm: a ``transformers`` causal LM.
        lm_tokenizer: its (fast) tokenizer.
        teacher: the teacher whose states are scored (a FlowModel).
        teacher_tokenizer: the teacher's ``tokenizers.Tokenizer``.
        teacher_identity: the teacher's checkpoint identity.
        lm_identity: sha256 of the LM's config, weights and tokenizer (computed if None).
        name: label for reports.
    """

    def __init__(
        self,
        lm: Any,
        lm_tokenizer: Any,
        teacher: FlowModel,
        teacher_tokenizer: Any,
        teacher_identity: str,
        lm_identity: str | None = None,
        name: str = "causal-lm",
    ):
        start, _ = document_tokens(lm_tokenizer)
        self.lm = lm.eval()
        self.lm_tokenizer = lm_tokenizer
        self.teacher = teacher.eval()
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_identity = teacher_identity
        self.start_id = int(start)
        self.max_len = getattr(lm.config, "max_position_embeddings", None)
        self.lm_identity = lm_identity or causal_lm_identity(lm, lm_tokenizer)
        self.identity = scorer_identity(self.lm_identity, teacher_identity)
        self.name = name

    @staticmethod
    def from_pretrained(
        lm_dir: str | Path, teacher: Checkpoint, device: str | torch.device = "cpu"
    ) -> CausalLMScorer:
        """A scorer from a local ``save_pretrained`` directory (safetensors only) and a teacher."""
        lm_dir = Path(lm_dir)
        check_lm_directory(lm_dir)
        if teacher.config.role != "teacher":
            raise CheckpointError(
                f"{teacher.spec} is a {teacher.config.role} checkpoint, but the causal-LM scorer "
                "denoises with a teacher"
            )
        loaded = load_causal_lm(lm_dir, device)
        lm, tok = loaded.model, loaded.tokenizer
        return CausalLMScorer(lm, tok, teacher.model, teacher.tokenizer, teacher.identity)

    @torch.no_grad()
    def denoise(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """x̂_1: (B, L) the teacher's argmax guess at the positions that may be noise."""
        _follow_device(self.teacher, x_t.device)
        cfg = self.teacher.config
        guess = self.teacher(x_t, batch_times(t, x_t.shape[0], x_t.device)).argmax(dim=-1)
        if cfg.source == "mask":
            return torch.where(x_t == cfg.mask_token_id, guess, x_t)
        return guess

    @torch.no_grad()
    def energy(self, x_t: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """(B, L) states at t → (B,) float32 mean token NLL (nats) of their denoised guesses."""
        device = x_t.device
        x_hat = self.denoise(x_t, t)
        texts = self.teacher_tokenizer.decode_batch(x_hat.tolist(), skip_special_tokens=True)
        encoded = self.lm_tokenizer(texts, add_special_tokens=False)["input_ids"]
        limit = None if self.max_len is None else self.max_len - 1
        seqs = [[self.start_id, *(y[:limit] or [self.start_id])] for y in encoded]
        _follow_device(self.lm, device)
        nll, counts = sequence_nll(self.lm, seqs, device, pad_id=self.start_id)
        return (nll / counts).float().to(device)
