"""A teacher of another family behind the solver's :class:`tsdfm.models.solver.Denoiser`.

:func:`plan` reads a checkpoint directory's files (config.json, the safetensors index,
tokenizer files, the model code) and decides everything the adapter needs without building
the network: family, the solver vocabulary (:class:`tsdfm.models.teachers.vocab.VocabMap`),
sequence length, time input, and the identity

    identity = sha256( canonical JSON {adapter facts, config.json}
                       + every tensor of every safetensors shard, in name order )

(:func:`tsdfm.models.identity.tensors_identity`). The adapter facts include the sha256 of
each ``.py`` file of the directory, so a change of the remote code is a new identity. The
build driver stops there; the actors call :func:`load` to build the network once.

The denoiser (:class:`AdaptedDenoiser`) maps solver ids to model ids, runs the network with
the family's calling convention and time input, and returns solver logits (B, L, V):

    mask source:    logits_1t = the model's logits without the mask column, never-drawn
                    tokens at NEVER, revealed positions carried over (SUBS: δ(x_t^i));
    uniform source: logits_1t = the model's logits, never-drawn tokens at NEVER.

Time input σ (MDLM with time conditioning, Duo): both define x_t with clean-token probability
α and total noise σ = −log α, with their time running from data to noise; the project's
mixture path has clean-token probability κ(t) with t running from noise to data, so the
network is given σ(t) = −log max(κ(t), ε), ε = 10⁻³ (their schedules' floor). A teacher with
no time input under the mask source is time-invariant: the sampler's exact cache applies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsdfm.models.backbone import BackboneConfig
from tsdfm.models.checkpoint import CONFIG_FILE, PICKLE_SUFFIXES, TOKENIZER_FILE, Checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.flow_model import ModelConfig, PrecisionMixin
from tsdfm.models.identity import tensors_identity
from tsdfm.models.path import MixturePath, parse_scheduler
from tsdfm.models.paths import confined
from tsdfm.models.teachers.families import Family, auto_map_classes, detect, family
from tsdfm.models.teachers.vocab import NEVER, VocabMap, carry_over

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
SIGMA_EPS = 1e-3
_SPECIAL_ID_KEYS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "cls_token_id",
    "sep_token_id",
    "unk_token_id",
)
_MASK_NAMES = ("[MASK]", "<mask>", "<|mask|>")


@dataclass(frozen=True)
class AdapterPlan:
    """What a teacher's files say, decided without building its network.

    Attributes:
        family: the adapter family.
        directory: where the files are.
        raw: config.json as read.
        weights: the safetensors files (one, or the shards of the index).
        code: ``.py`` file name → sha256 of the files in the directory (remote code).
        vocab: model ids ↔ solver ids.
        seq_len: L of the sequences the teacher makes.
        time_input: none | sigma.
        trust_remote_code: whether the user allowed the model's own code to run.
        config: the teacher's :class:`ModelConfig` in solver terms (``provenance.adapter``
            holds the adapter facts).
        identity: ``sha256:<hex>`` (module docstring).
    """

    family: Family
    directory: Path
    raw: dict
    weights: tuple[Path, ...]
    code: dict[str, str]
    vocab: VocabMap
    seq_len: int
    time_input: str
    trust_remote_code: bool
    config: ModelConfig
    identity: str = field(compare=False)

    def facts(self) -> dict[str, Any]:
        """The adapter facts hashed into the identity and recorded in the config."""
        return adapter_facts(
            self.family, self.raw, self.vocab, self.seq_len, self.time_input, self.code
        )


def adapter_facts(
    fam: Family, raw: dict, vocab: VocabMap, seq_len: int, time_input: str, code: dict[str, str]
) -> dict[str, Any]:
    """What the adapter decided from the files: hashed into the identity, recorded in the
    teacher's config (``provenance.adapter``)."""
    return {
        "family": fam.name,
        "model_type": raw.get("model_type"),
        "model_vocab": vocab.model_vocab,
        "mask_id": vocab.mask_id,
        "never": list(vocab.never),
        "seq_len": seq_len,
        "time_input": time_input,
        "code": dict(code),
    }


def read_raw_config(directory: Path) -> dict:
    """config.json of ``directory`` as a dict, or a CheckpointError saying what is wrong."""
    path = directory / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{directory} lacks {CONFIG_FILE}; a teacher directory needs one")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    return raw


def weight_files(directory: Path) -> tuple[Path, ...]:
    """The safetensors files of ``directory``: the shards its index names, or the one file.

    Pickled weights are refused with the command that converts them.
    """
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(
                f"{index} is not a safetensors index (a JSON object with a weight_map)"
            ) from None
        files = tuple(confined(directory, str(n), f"a shard in {INDEX_FILE}") for n in names)
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{directory} lacks the shard(s) {', '.join(missing)} that {INDEX_FILE} names; "
                "download the whole checkpoint"
            )
        return files
    if (directory / WEIGHTS_FILE).exists():
        return (directory / WEIGHTS_FILE,)
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickled weights ({', '.join(pickles)}); pickles are "
            f"refused at build time: convert them with `tsdfm-pipeline teacher import "
            f"{directory / pickles[0]} --out DIR`"
        )
    raise CheckpointError(f"{directory} lacks {WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")


def code_files(directory: Path) -> dict[str, str]:
    """``name → sha256`` of the ``.py`` files at the top of ``directory``."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.py"))
    }


def check_remote_code(
    fam: Family, raw: dict, code: dict[str, str], where: str, trust: bool
) -> None:
    """Remote code only on request, and only from the checkpoint itself."""
    if not fam.remote_code:
        return
    classes = auto_map_classes(raw)
    target = classes.get("AutoModelForMaskedLM") or classes.get("AutoModel")
    if target is None:
        raise CheckpointError(
            f"{where}: a {fam.name} checkpoint names its model class in config.json auto_map "
            "(AutoModelForMaskedLM); this one has none"
        )
    for ref in classes.values():
        module = ref.split(".")[0]
        if "--" in ref or f"{module}.py" not in code:
            raise CheckpointError(
                f"{where}: config.json auto_map {ref!r} points at code outside the checkpoint; "
                "only the checkpoint's own .py files may run"
            )
    if not trust:
        raise CheckpointError(
            f"{where} runs its own model code ({target.split('.')[0]}.py); read it, then pass "
            "--trust-remote-code to allow it"
        )


def _tokenizer_file(directory: Path):
    from tsdfm.models.checkpoint import read_tokenizer

    path = directory / TOKENIZER_FILE
    return read_tokenizer(path) if path.exists() else None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def mask_id_of(fam: Family, raw: dict, directory: Path, tok: Any, where: str) -> int | None:
    """The model's mask id: None under the uniform source; MDLM's vocab_size − 1; else
    config.json ``mask_token_id``, the tokenizer's mask token, or a [MASK]-like token."""
    if fam.source == "uniform":
        return None
    if fam.name == "mdlm":
        return int(raw.get("mask_token_id", int(raw["vocab_size"]) - 1))
    if isinstance(raw.get("mask_token_id"), int):
        return raw["mask_token_id"]
    names = []
    tc = directory / "tokenizer_config.json"
    if tc.exists():
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            names.append(_token_content(json.loads(tc.read_text()).get("mask_token")))
    names.extend(_MASK_NAMES)
    if tok is not None:
        for name in names:
            if name is not None and tok.token_to_id(name) is not None:
                return int(tok.token_to_id(name))
    raise CheckpointError(
        f"{where}: cannot find the mask token (no mask_token_id in config.json, no mask token "
        "in the tokenizer); save the tokenizer with the model"
    )


def never_ids(raw: dict, tok: Any, model_vocab: int, mask_id: int | None) -> tuple[int, ...]:
    """Model ids never drawn: the tokenizer's special tokens, the config's special ids, and
    output rows the tokenizer has no token for."""
    never = {raw[k] for k in _SPECIAL_ID_KEYS if isinstance(raw.get(k), int)}
    if tok is not None:
        data = json.loads(tok.to_str())
        never |= {int(a["id"]) for a in data.get("added_tokens", []) if a.get("special")}
        never |= set(range(tok.get_vocab_size(), model_vocab))
    never.discard(mask_id)
    return tuple(sorted(j for j in never if 0 <= j < model_vocab))


def seq_len_of(fam: Family, raw: dict, where: str) -> int:
    """L: MDLM/Duo ``model_length``; RoBERTa's positions less its padding offset; else
    ``max_position_embeddings``."""
    value = raw.get("model_length") or raw.get("max_position_embeddings")
    if not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"{where}: config.json gives no sequence length (model_length or "
            "max_position_embeddings)"
        )
    if (
        raw.get("model_type") in ("roberta", "xlm-roberta", "camembert")
        and "model_length" not in raw
    ):
        value -= int(raw.get("pad_token_id", 1)) + 1  # position ids start after the padding id
    return value


def time_input_of(fam: Family, raw: dict) -> str:
    if fam.name == "mdlm":
        return "sigma" if raw.get("time_conditioning") else "none"
    return fam.time_input


def plan(
    directory: Path,
    spec: str,
    teacher_format: str | None = None,
    trust_remote_code: bool = False,
) -> AdapterPlan:
    """Read a teacher of another family from its files (module docstring); builds nothing."""
    raw = read_raw_config(directory)
    fam = family(teacher_format) if teacher_format else detect(raw, spec)
    if fam.name == "tsdfm":
        raise CheckpointError(f"{spec} is this project's format; load it with load_checkpoint")
    if not isinstance(raw.get("vocab_size"), int):
        raise CheckpointError(f"{spec}: config.json has no integer vocab_size")
    weights = weight_files(directory)
    code = code_files(directory)
    check_remote_code(fam, raw, code, spec, trust_remote_code)
    tok = _tokenizer_file(directory)
    M = int(raw["vocab_size"])
    mask_id = mask_id_of(fam, raw, directory, tok, spec)
    vocab = VocabMap(M, mask_id, never_ids(raw, tok, M, mask_id))
    seq_len = seq_len_of(fam, raw, spec)
    time_input = time_input_of(fam, raw)
    V = vocab.vocab_size
    mask = fam.source == "mask"
    facts = adapter_facts(fam, raw, vocab, seq_len, time_input, code)
    config = ModelConfig(
        role="teacher",
        source=fam.source,
        scheduler=parse_scheduler("linear").to_dict(),
        vocab_size=V,
        special_tokens={"mask": V} if mask else {},
        seq_len=seq_len,
        backbone=BackboneConfig(
            vocab_in=V + (1 if mask else 0),
            vocab_out=V,
            max_len=seq_len,
            time_conditioning=time_input != "none",
        ),
        data={"kind": "external", "family": fam.name},
        provenance={"adapter": {**facts, "trust_remote_code": trust_remote_code}},
    )
    identity = tensors_identity({"adapter": facts, "config": raw}, list(weights))
    return AdapterPlan(
        fam,
        directory,
        raw,
        weights,
        code,
        vocab,
        seq_len,
        time_input,
        trust_remote_code,
        config,
        identity,
    )


class SolverTokenizer:
    """A ``tokenizers.Tokenizer`` seen in solver ids (:class:`VocabMap`): what the pipeline
    calls on a teacher's tokenizer (decode, encode, vocabulary size, token lookups)."""

    def __init__(self, tokenizer: Any, vocab: VocabMap):
        self.tokenizer = tokenizer
        self.vocab = vocab

    def get_vocab_size(self) -> int:
        return self.vocab.vocab_size + (0 if self.vocab.mask_id is None else 1)

    def _model_ids(self, ids: list[int]) -> list[int]:
        return self.vocab.to_model(torch.tensor(ids, dtype=torch.long)).tolist() if ids else []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(self._model_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def encode_ids(self, text: str) -> list[int]:
        """Solver ids of ``text`` (no special tokens added)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.vocab.to_internal(torch.tensor(ids, dtype=torch.long)).tolist() if ids else []

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        """token → solver id (tokens of output rows past the tokenizer are absent)."""
        vocab = self.tokenizer.get_vocab(with_added_tokens=with_added_tokens)
        return {tok: self.token_to_id(tok) for tok in vocab}

    def token_to_id(self, token: str) -> int | None:
        j = self.tokenizer.token_to_id(token)
        return None if j is None else int(self.vocab.to_internal(torch.tensor(j)))

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(self._model_ids([i])[0])

    def solver_tokenizer(self):
        """A ``tokenizers.Tokenizer`` whose ids are the solver's: solver id i is named by the
        teacher's token of model id ``to_model(i)`` (``<unused{i}>`` for an output row the
        tokenizer has no token for, or a repeated name), and ``[MASK]`` is V under the mask
        source. It is what a checkpoint that reads solver ids stores (a compass of this
        teacher): it has the vocabulary size and [MASK] id ``load_checkpoint`` checks and
        decodes solver ids to the teacher's token strings; text is encoded with the
        teacher's own tokenizer (:meth:`encode_ids`), not with it."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        V, mask = self.vocab.vocab_size, self.vocab.mask_id is not None
        vocab: dict[str, int] = {"[MASK]": V} if mask else {}
        names = []
        for i in range(V):
            name = self.id_to_token(i)
            name = f"<unused{i}>" if name is None or name in vocab else name
            vocab[name] = i
            names.append(name)
        unk_name = next((n for n in ("[UNK]", "<unk>") if n in vocab), names[0])
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk_name))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return tok

    def save(self, path: str) -> None:
        """Write :meth:`solver_tokenizer` (solver ids) as a tokenizer.json at ``path``."""
        self.solver_tokenizer().save(path)


class AdaptedDenoiser(PrecisionMixin, nn.Module):
    """p(x_1 | x_t) of a teacher of another family, in solver ids (module docstring).

    ``forward(x_t, t, h)``: x_t (B, L) int64 solver ids (mask = V), t (B,) → (B, L, V) float32
    logits; h is ignored (a teacher does not depend on the step size).
    """

    def __init__(self, network: nn.Module, config: ModelConfig, plan: AdapterPlan):
        super().__init__()
        self.network = network
        self.config = config
        self.vocab = plan.vocab
        self.family = plan.family.name
        self.time_input = plan.time_input
        self.precision = "fp32"

    @property
    def time_invariant(self) -> bool:
        return self.config.source == "mask" and self.time_input == "none"

    @property
    def path(self) -> MixturePath:
        return self.config.path()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = −log max(κ(t), ε): the total noise the network is conditioned on, (B,)."""
        kappa = torch.as_tensor(self.path.scheduler.kappa(t.double()))
        return -torch.log(kappa.clamp(min=SIGMA_EPS, max=1.0))

    def network_logits(self, ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's own output (B, L, M) on model ids, by the family's convention."""
        if self.family == "masked-lm":
            out = self.network(input_ids=ids)
        else:
            if self.time_input == "sigma":
                sigma = self.sigma(t)
            else:
                sigma = torch.zeros(ids.shape[0], dtype=torch.float64)
            param = next(self.network.parameters())
            out = self.network(ids, sigma.to(device=ids.device, dtype=param.dtype))
        logits = getattr(out, "logits", out)
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        with self._autocast(x_t.device):
            raw = self.network_logits(self.vocab.to_model(x_t), t)
        logits = self.vocab.logits(raw)  # float32 (float64 when the network is)
        if self.config.source == "mask":
            logits = carry_over(logits, x_t, self.config.vocab_size)
        return logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "this teacher loads with transformers, which is not installed; "
            "pip install 'tsdfm-pipeline[text]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_network(p: AdapterPlan, device: str | torch.device = "cpu") -> nn.Module:
    """Build the network of ``p`` from its safetensors files (never a pickle)."""
    transformers = _transformers()
    remote = p.family.remote_code and p.trust_remote_code
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG does not move
        try:
            net, info = transformers.AutoModelForMaskedLM.from_pretrained(
                str(p.directory),
                trust_remote_code=remote,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
            )
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{p.directory} does not load as a {p.family.name} ({first})"
            ) from None
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise CheckpointError(
            f"weights in {p.directory} lack {len(missing)} tensor(s) its config.json needs "
            f"(e.g. {sorted(missing)[0]}); the checkpoint is incomplete"
        )
    out = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    rows = getattr(out, "out_features", None) if out is not None else None
    if rows is not None and rows != p.vocab.model_vocab:
        raise CheckpointError(
            f"{p.directory}: the output layer has {rows} rows, config.json vocab_size "
            f"{p.vocab.model_vocab}"
        )
    return net.to(device).eval()


def load(p: AdapterPlan, spec: str, device: str | torch.device = "cpu") -> Checkpoint:
    """The teacher of ``p`` as a :class:`Checkpoint`: model = :class:`AdaptedDenoiser`."""
    model = AdaptedDenoiser(load_network(p, device), p.config, p).eval()
    tok = _tokenizer_file(p.directory)
    tokenizer = SolverTokenizer(tok, p.vocab) if tok is not None else None
    return Checkpoint(model, p.config, tokenizer, p.directory, p.identity, str(spec))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "NEVER",
    "AdaptedDenoiser",
    "AdapterPlan",
    "SolverTokenizer",
    "load",
    "load_network",
    "plan",
]
