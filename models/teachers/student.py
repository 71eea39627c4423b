"""A few-step student of an adapter teacher: the teacher's own network plus a step-size branch.

``AdapterStudent`` wraps the teacher's :class:`~tsdfm.models.teachers.adapter.AdaptedDenoiser`
and adds a step-size branch on its output: logits(x_t, t, h) = teacher(x_t, t) + b(h), where
b(h) = W₂ · SiLU(W₁ · φ(h) + c₁) + c₂ is one bias per data token and φ(h) a few sinusoidal
features of h. W₂ and c₂ start at zero, so at initialisation the student is the teacher
exactly. Revealed positions are carried over after the branch (SUBS), as in the teacher.

Its checkpoint is this project's format (config.json, model.safetensors, the teacher's own
tokenizer.json in model ids). ``config.data`` records the adapter: the family, the
transformers config of the network (``hf_config``) and the vocabulary map, so the network is
rebuilt from that config with the native transformers class and no file of the teacher's
folder is needed. Only native families rebuild so (``masked-lm``); a remote-code family's
student is refused (its network's code is not in the student's folder).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from tsdfm.models.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    Checkpoint,
    check_role,
    identity,
    load_weights,
    resolve,
)
from tsdfm.models.errors import CheckpointError
from tsdfm.models.flow_model import ModelConfig, PrecisionMixin
from tsdfm.models.teachers.adapter import AdaptedDenoiser, SolverTokenizer, _transformers
from tsdfm.models.teachers.vocab import VocabMap, carry_over

DATA_KIND = "adapter-student"
NATIVE_FAMILIES = ("masked-lm",)
H_FEATURES = 8  # sinusoidal features of h
H_HIDDEN = 64


def h_features(h: torch.Tensor) -> torch.Tensor:
    """φ(h): (B,) → (B, 2·H_FEATURES), sin/cos of h at frequencies 2^k·π, k = 0..7."""
    freqs = math.pi * 2.0 ** torch.arange(H_FEATURES, dtype=torch.float32, device=h.device)
    arg = h.float().unsqueeze(-1) * freqs
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


class AdapterStudent(PrecisionMixin, nn.Module):
    """The teacher adapter's network with a zero-initialised step-size branch (module docstring).

    ``forward(x_t, t, h)``: (B, L) solver ids, t (B,), h (B,) → (B, L, V) float32 logits.
    """

    def __init__(self, teacher: AdaptedDenoiser, config: ModelConfig):
        super().__init__()
        self.teacher = teacher
        self.config = config
        V = config.vocab_size
        self.h_in = nn.Linear(2 * H_FEATURES, H_HIDDEN)
        self.h_out = nn.Linear(H_HIDDEN, V)
        nn.init.zeros_(self.h_out.weight)
        nn.init.zeros_(self.h_out.bias)
        self.precision = "fp32"

    @property
    def time_invariant(self) -> bool:
        """False: the step-size branch makes the output depend on h (no exact cache)."""
        return False

    @property
    def path(self):
        return self.config.path()

    def set_precision(self, precision: str):
        super().set_precision(precision)
        self.teacher.set_precision(precision)
        return self

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        B = x_t.shape[0]
        logits = self.teacher(x_t, t)
        if h is None:
            return logits
        h = torch.as_tensor(h, dtype=torch.float32, device=x_t.device).expand(B)
        bias = self.h_out(nn.functional.silu(self.h_in(h_features(h))))
        logits = logits + bias.to(logits.dtype).unsqueeze(1)
        if self.config.source == "mask":
            logits = carry_over(logits, x_t, self.config.vocab_size)
        return logits

    def state_dict(self, *args, **kwargs):
        """The weights, tied tensors (an MLM head tied to the embeddings) as separate copies,
        so safetensors can write them; loading copies the same values into the tied one."""
        state = super().state_dict(*args, **kwargs)
        seen: set[int] = set()
        for k, v in state.items():
            ptr = v.untyped_storage().data_ptr() if v.numel() else None
            if ptr is not None and ptr in seen:
                state[k] = v.clone()
            elif ptr is not None:
                seen.add(ptr)
        return state


def _plan_view(family: str, vocab: VocabMap, time_input: str) -> SimpleNamespace:
    """What :class:`AdaptedDenoiser` reads of an adapter plan."""
    return SimpleNamespace(vocab=vocab, family=SimpleNamespace(name=family), time_input=time_input)


def student_from_adapter(teacher: Checkpoint) -> AdapterStudent:
    """The student of an adapter teacher checkpoint (``open_teacher``), equal to it at init."""
    model = teacher.model
    if not isinstance(model, AdaptedDenoiser):
        raise CheckpointError(f"{teacher.spec} is not an adapter teacher")
    if model.family not in NATIVE_FAMILIES:
        raise CheckpointError(
            f"distill --init {teacher.spec}: a student of a {model.family} teacher is not "
            "supported yet (its network runs remote code); students of "
            f"{', '.join(NATIVE_FAMILIES)} teachers are"
        )
    facts = teacher.config.provenance["adapter"]
    raw = json.loads((teacher.directory / CONFIG_FILE).read_text())
    data = {
        "kind": DATA_KIND,
        "family": model.family,
        "adapter": {k: v for k, v in facts.items() if k != "trust_remote_code"},
        "hf_config": raw,
    }
    config = teacher.config.replace(role="student", data=data)
    return AdapterStudent(model, config)


def is_adapter_student(directory: Path) -> bool:
    """Whether ``directory``'s config.json is an adapter student's."""
    try:
        raw = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and (raw.get("data") or {}).get("kind") == DATA_KIND


def _network(hf_config: dict, family: str, where: str) -> nn.Module:
    if family not in NATIVE_FAMILIES:
        raise CheckpointError(f"{where}: a {family} student cannot be rebuilt without its code")
    transformers = _transformers()
    rest = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    try:
        cfg = transformers.AutoConfig.for_model(hf_config["model_type"], **rest)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json data.hf_config is not usable ({e})") from None
    with torch.random.fork_rng(devices=[]):
        return transformers.AutoModelForMaskedLM.from_config(cfg, dtype=torch.float32)


def load_adapter_student(spec, device="cpu", role=("student",)) -> Checkpoint:
    """Load an adapter student saved by ``distill`` (module docstring) as a Checkpoint;
    its tokenizer is the teacher's, seen in solver ids (:class:`SolverTokenizer`)."""
    from tsdfm.models.checkpoint import read_config, read_tokenizer

    directory = resolve(spec)
    config = read_config(directory)
    check_role(spec, config, role)
    data = config.data
    if data.get("kind") != DATA_KIND:
        raise CheckpointError(f"{spec} is not an adapter student (config.json data.kind)")
    facts = data["adapter"]
    vocab = VocabMap(int(facts["model_vocab"]), facts["mask_id"], tuple(facts["never"]))
    net = _network(data["hf_config"], data["family"], str(spec))
    teacher = AdaptedDenoiser(net, config, _plan_view(data["family"], vocab, facts["time_input"]))
    model = AdapterStudent(teacher, config)
    state = load_weights(model, directory)
    tok_path = directory / TOKENIZER_FILE
    tokenizer = SolverTokenizer(read_tokenizer(tok_path), vocab) if tok_path.exists() else None
    ident = identity(config.to_dict(), state)
    model.to(device).eval()
    return Checkpoint(model, config, tokenizer, directory, ident, str(spec))


__all__ = [
    "AdapterStudent",
    "is_adapter_student",
    "load_adapter_student",
    "student_from_adapter",
]
