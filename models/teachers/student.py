"""A few-step student of an adapter teacher: the teacher's own network plus a step-size branch.

``AdapterStudent`` wraps the teacher's :class:`~tsdfm.models.teachers.adapter.AdaptedDenoiser`
and adds a step-size branch on its output: logits(x_t, t, h) = teacher(x_t, t) + b(h), where
b(h) = W₂ · SiLU(W₁ · φ(h) + c₁) + c₂ is one bias per data token and φ(h) a few sinusoidal
features of h. W₂ and c₂ start at zero, so at initialisation the student is the teacher
exactly. Revealed positions are carried over after the branch (SUBS), as in the teacher; a
time-conditioned teacher (Duo) keeps its time input σ(t) and its uniform source.

Its checkpoint is this project's format (config.json, model.safetensors, the teacher's own
tokenizer.json in model ids). ``config.data`` records the adapter: the family, the
transformers config of the network (``hf_config``) and the vocabulary map, so no file of
the teacher's folder is needed:

- a native family (``masked-lm``) rebuilds its network from ``hf_config`` with the native
  transformers class;
- a remote-code family (``mdlm``, ``duo``) carries its network's code: the modules that
  ``hf_config.auto_map`` names and the local modules they import (transitively) are copied
  beside config.json, and ``data.remote_code.files`` records each file's sha256 (the same
  hashes the teacher's identity covers). Loading it needs ``trust_remote_code``, checks
  every file against its recorded sha256 before anything is imported, and builds the network
  through transformers' dynamic-module path from the student's folder.
"""

from __future__ import annotations

import ast
import hashlib
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
from tsdfm.models.paths import confined
from tsdfm.models.teachers.adapter import AdaptedDenoiser, SolverTokenizer, _transformers
from tsdfm.models.teachers.families import FAMILIES, auto_map_classes
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
    """The student of an adapter teacher checkpoint (``open_teacher``), equal to it at init.

    A remote-code teacher's student records the sha256 of the code it carries
    (:func:`student_code`) in ``config.data.remote_code``."""
    model = teacher.model
    if not isinstance(model, AdaptedDenoiser):
        raise CheckpointError(f"{teacher.spec} is not an adapter teacher")
    facts = teacher.config.provenance["adapter"]
    raw = json.loads((teacher.directory / CONFIG_FILE).read_text())
    data = {
        "kind": DATA_KIND,
        "family": model.family,
        "adapter": {k: v for k, v in facts.items() if k != "trust_remote_code"},
        "hf_config": raw,
    }
    if _remote(model.family):
        code = student_code(teacher)
        data["remote_code"] = {"files": {name: _sha256(b) for name, b in code.items()}}
    config = teacher.config.replace(role="student", data=data)
    return AdapterStudent(model, config)


def _remote(family: str) -> bool:
    return family in FAMILIES and FAMILIES[family].remote_code


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _local_imports(source: bytes, name: str, where: str) -> list[str]:
    """Module names ``source`` imports relative to its own folder (``from .x import y``,
    ``from . import x``)."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as e:
        raise CheckpointError(f"{where}: {name} is not valid Python ({e.msg})") from None
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module:
                found.append(node.module.split(".")[0])
            else:
                found.extend(alias.name for alias in node.names)
    return found


def code_closure(directory: Path, hf_config: dict, hashes: dict[str, str], where: str):
    """The network's code in ``directory``: the modules ``hf_config``'s ``auto_map`` names,
    then every local module they import, transitively; name → bytes, each checked against
    ``hashes`` (name → sha256) before it is returned.

    ``hashes`` is what vouches for the code: the teacher's adapter facts (the sha256 its
    identity covers) or a student's ``data.remote_code.files``."""
    todo = sorted({ref.split(".")[0] for ref in auto_map_classes(hf_config).values()})
    if not todo:
        raise CheckpointError(f"{where}: config.json names no model code (auto_map)")
    files: dict[str, bytes] = {}
    while todo:
        module = todo.pop()
        name = f"{module}.py"
        if name in files:
            continue
        path = confined(directory, name, f"a code file of {where}")
        if name not in hashes:
            raise CheckpointError(
                f"{where}: {name} is not among the code files its config.json records "
                f"({', '.join(sorted(hashes)) or 'none'}); only recorded code may run"
            )
        try:
            content = path.read_bytes()
        except OSError:
            raise CheckpointError(f"{where} lacks {name}, the model code it needs") from None
        if _sha256(content) != hashes[name]:
            raise CheckpointError(
                f"{where}: {name} has sha256 {_sha256(content)[:16]}…, but {hashes[name][:16]}… "
                "is recorded; the model code changed after it was recorded: restore the "
                "original file"
            )
        files[name] = content
        for imported in _local_imports(content, name, str(where)):
            if (directory / f"{imported}.py").exists() or f"{imported}.py" in hashes:
                todo.append(imported)
    return dict(sorted(files.items()))


def student_code(init: Checkpoint) -> dict[str, bytes]:
    """The code files (name → bytes) a student of ``init`` carries beside its weights: a
    remote-code adapter teacher's, or a remote-code adapter student's own (each checked
    against its recorded sha256, :func:`code_closure`); {} for any other checkpoint."""
    model = init.model
    if isinstance(model, AdaptedDenoiser) and _remote(model.family):
        hf_config = json.loads((init.directory / CONFIG_FILE).read_text())
        hashes = init.config.provenance["adapter"]["code"]
        return code_closure(init.directory, hf_config, hashes, str(init.spec))
    data = init.config.data
    if isinstance(model, AdapterStudent) and "remote_code" in data:
        hashes = data["remote_code"]["files"]
        return code_closure(init.directory, data["hf_config"], hashes, str(init.spec))
    return {}


def is_adapter_student(directory: Path) -> bool:
    """Whether ``directory``'s config.json is an adapter student's."""
    try:
        raw = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and (raw.get("data") or {}).get("kind") == DATA_KIND


def _native_network(hf_config: dict, where: str) -> nn.Module:
    transformers = _transformers()
    rest = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures")}
    try:
        cfg = transformers.AutoConfig.for_model(hf_config["model_type"], **rest)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json data.hf_config is not usable ({e})") from None
    with torch.random.fork_rng(devices=[]):
        return transformers.AutoModelForMaskedLM.from_config(cfg, dtype=torch.float32)


def _remote_network(directory: Path, hf_config: dict, where: str) -> nn.Module:
    """The network of a remote-code student, built from the code in its folder (already
    checked by :func:`code_closure`) through transformers' dynamic-module path."""
    transformers = _transformers()
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    classes = auto_map_classes(hf_config)
    if "AutoConfig" not in classes or "AutoModelForMaskedLM" not in classes:
        raise CheckpointError(
            f"{where}: config.json data.hf_config.auto_map needs AutoConfig and "
            "AutoModelForMaskedLM entries"
        )
    try:
        config_class = get_class_from_dynamic_module(classes["AutoConfig"], str(directory))
        cfg = config_class.from_dict(hf_config)
        cfg._name_or_path = str(directory)  # where from_config finds the model's code
        with torch.random.fork_rng(devices=[]):
            return transformers.AutoModelForMaskedLM.from_config(
                cfg, trust_remote_code=True, dtype=torch.float32
            )
    except (OSError, ValueError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{where}: the student's model code does not build ({first})"
        ) from None


def load_adapter_student(
    spec, device="cpu", role=("student",), trust_remote_code: bool = False
) -> Checkpoint:
    """Load an adapter student saved by ``distill`` (module docstring) as a Checkpoint;
    its tokenizer is the teacher's, seen in solver ids (:class:`SolverTokenizer`).

    A remote-code family's student loads only with ``trust_remote_code``, and only when each
    code file it carries has the sha256 its config.json records."""
    from tsdfm.models.checkpoint import read_config, read_tokenizer

    directory = resolve(spec)
    config = read_config(directory)
    check_role(spec, config, role)
    data = config.data
    if data.get("kind") != DATA_KIND:
        raise CheckpointError(f"{spec} is not an adapter student (config.json data.kind)")
    facts, family = data["adapter"], data["family"]
    vocab = VocabMap(int(facts["model_vocab"]), facts["mask_id"], tuple(facts["never"]))
    if family in NATIVE_FAMILIES:
        net = _native_network(data["hf_config"], str(spec))
    elif not _remote(family) or "remote_code" not in data:
        raise CheckpointError(f"{spec}: a {family} student cannot be rebuilt without its code")
    else:
        hashes = data["remote_code"]["files"]
        if not trust_remote_code:
            raise CheckpointError(
                f"{spec} is a student of a {family} teacher and runs that model's code "
                f"({', '.join(sorted(hashes))}); read it, then pass --trust-remote-code to "
                "allow it"
            )
        code_closure(directory, data["hf_config"], hashes, str(spec))
        net = _remote_network(directory, data["hf_config"], str(spec))
    teacher = AdaptedDenoiser(net, config, _plan_view(family, vocab, facts["time_input"]))
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
    "student_code",
    "student_from_adapter",
]
