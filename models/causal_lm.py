"""A local ``transformers`` causal language model: loading, identity and batched scoring.

Shared by the causal-LM scorer of the navigator (``tsdfm.models.compass.CausalLMScorer``) and the
causal-LM evaluators (``tsdfm.models.eval.evaluators``). For a token sequence y_0, y_1, …, y_T with
y_0 a start token,

    NLL(y) = −Σ_{j=1..T} log p_LM(y_j | y_<j)        (nats, T counted tokens)

computed for a whole batch at once: right padding, masked out of the sums.

A model is a local directory written by ``save_pretrained`` (``config.json``,
``model.safetensors`` and the tokenizer files), or a GGUF file in a directory (``gguf`` and
``accelerate`` must be installed; GGUF weights are dequantized to float32). Pickled weights
(``pytorch_model.bin``, ``.pt``, …) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from tsdfm.models.checkpoint import PICKLE_SUFFIXES, identity
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.extras import require
from tsdfm.models.hashing import file_sha256, sha256_json

DOCUMENT_TOKEN = "<|endoftext|>"
PROJECT_LM_FILE = "tsdfm_lm.json"  # written beside an LM trained by `tsdfm-pipeline lm train`
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class CausalLM:
    """A loaded causal LM and how texts are framed for it.

    Attributes:
        model: the ``transformers`` model, in eval mode.
        tokenizer: its tokenizer.
        identity: ``sha256:...`` of what was loaded: config, weights and tokenizer
            (:func:`lm_identity`), or for a GGUF file the file's bytes.
        source: where it came from (directory, plus ``::file.gguf`` for GGUF).
        start_id: y_0, the token every scored sequence starts with.
        end_id: the token that ends a document (appended to a sample that ended).
        max_len: most positions the model takes (None when unbounded).
        gguf_sha256: sha256 of the GGUF file the weights came from, if any.
    """

    model: Any
    tokenizer: Any
    identity: str
    source: str
    start_id: int
    end_id: int
    max_len: int | None
    gguf_sha256: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> CausalLM:
        self.model.to(device)
        return self


def document_tokens(tokenizer: Any) -> tuple[int, int]:
    """(start, end) token ids that frame a document for this tokenizer.

    ``<|endoftext|>`` both starts and ends a document when the vocabulary has it (GPT-2,
    SmolLM2 — whose BOS ``<|im_start|>`` opens a chat turn, not a document — and this
    project's own tokenizers); otherwise BOS starts (EOS when there is no BOS) and EOS ends.
    """
    vocab = tokenizer.get_vocab()
    if DOCUMENT_TOKEN in vocab:
        doc = int(vocab[DOCUMENT_TOKEN])
        return doc, doc
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    end = tokenizer.eos_token_id
    if start is None:
        start = end
    if start is None or end is None:
        raise ConfigError(
            "the causal LM's tokenizer has neither a BOS nor an EOS token to frame documents "
            "with; set bos_token and eos_token in its tokenizer_config.json"
        )
    return int(start), int(end)


def lm_identity(lm: Any, tokenizer: Any) -> str:
    """sha256 of the LM's config and weights (as for checkpoints) plus its tokenizer."""
    config = json.loads(lm.config.to_json_string(use_diff=False))
    weights = identity(config, lm.state_dict())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    h = hashlib.sha256(weights.encode())
    h.update(tok_text.encode())
    return "sha256:" + h.hexdigest()


def gguf_identity(path: Path) -> str:
    """Identity of a GGUF weights file: ``sha256:`` and the hex sha256 of its bytes."""
    return "sha256:" + file_sha256(path)


def scorer_identity(lm_identity: str, teacher_identity: str) -> str:
    """Identity of the causal-LM scorer (``tsdfm.models.compass.CausalLMScorer``): the sha256 of
    {"scorer": "causal-lm", "lm": LM identity, "teacher": teacher identity}."""
    parts = {"scorer": "causal-lm", "lm": lm_identity, "teacher": teacher_identity}
    return sha256_json(parts, "the scorer identity", ConfigError)


def check_lm_directory(directory: Path, gguf_file: str | None = None) -> None:
    """Refuse what cannot be loaded safely, naming the problem and the fix (CheckpointError)."""
    if str(directory).endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{directory} is a pickle file; pass a directory saved with save_pretrained "
            "(config.json + model.safetensors)"
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"causal LM directory {directory} not found or lacks config.json; pass a local "
            "directory written by save_pretrained"
        )
    if gguf_file is not None:
        if not (directory / gguf_file).is_file():
            raise CheckpointError(
                f"{directory} has no GGUF file {gguf_file!r}; pass DIR::FILE.gguf with a file "
                "that is in DIR"
            )
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            raise CheckpointError(
                f"loading {gguf_file} needs the package(s) {', '.join(missing)}; "
                "pip install 'tsdfm-pipeline[eval]'"
            )
        return
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"causal LM directory {directory} not found or lacks config.json; pass a local "
            "directory written by save_pretrained"
        )
    if not any((directory / w).is_file() for w in _SAFE_WEIGHTS):
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"could not load the causal LM in {directory}: it holds only pickled weights "
                f"({', '.join(pickles)}), which are refused; re-save it with "
                "save_pretrained(safe_serialization=True)"
            )
        raise CheckpointError(
            f"could not load the causal LM in {directory} (no model.safetensors); pass a "
            "directory written by save_pretrained"
        )
    if not any((directory / t).is_file() for t in _TOKENIZER_FILES):
        raise CheckpointError(
            f"could not load the causal LM in {directory} (no tokenizer.json); save its "
            "tokenizer into the same directory with tokenizer.save_pretrained"
        )


def load_causal_lm(
    directory: str | Path, device: str | torch.device = "cpu", gguf_file: str | None = None
) -> CausalLM:
    """Load a local causal LM (safetensors, or a GGUF file) and its tokenizer, float32, eval.

    Args:
        directory: a ``save_pretrained`` directory, or the directory holding ``gguf_file``.
        device: where to put the weights.
        gguf_file: name of a GGUF file inside ``directory`` to load instead.
    """
    directory = Path(directory).expanduser()
    check_lm_directory(directory, gguf_file)
    require("transformers", "text", "a causal LM scorer or evaluator")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = (
        {"gguf_file": gguf_file} if gguf_file is not None else {"use_safetensors": True}
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            str(directory), **({"gguf_file": gguf_file} if gguf_file else {})
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not load the causal LM in {directory} ({first})") from None
    model.to(device).eval()
    gguf_sha = None if gguf_file is None else gguf_identity(directory / gguf_file)
    ident = gguf_sha or lm_identity(model, tokenizer)
    source = str(directory) + (f"::{gguf_file}" if gguf_file else "")
    start, end = document_tokens(tokenizer)
    max_len = getattr(model.config, "max_position_embeddings", None)
    return CausalLM(model, tokenizer, ident, source, start, end, max_len, gguf_sha)


@torch.no_grad()
def sequence_nll(
    model: Any,
    seqs: Sequence[Sequence[int]],
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL(y) = −Σ_{j=1..T} log p(y_j | y_<j) of each sequence y = (y_0, …, y_T).

    Sequences are sorted by length and scored ``batch_size`` at a time (all at once when
    None), right-padded with ``pad_id`` under an attention mask; a sequence's result does not
    depend on its batch-mates beyond float rounding.

    Args:
        model: a ``transformers`` causal LM.
        seqs: n token-id sequences, each of length ≥ 1 (y_0 is context, never counted).
        device: where to run (default: the model's device).
        batch_size: sequences per forward pass.

    Returns:
        (n,) float64 NLL in nats and (n,) int64 counted tokens T.
    """
    n = len(seqs)
    device = device or next(model.parameters()).device
    nll = torch.zeros(n, dtype=torch.float64)
    counts = torch.tensor([max(len(s) - 1, 0) for s in seqs], dtype=torch.long)
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    step = batch_size or max(n, 1)
    for lo in range(0, n, step):
        idx = order[lo : lo + step]
        batch = [torch.as_tensor(seqs[i], dtype=torch.long) for i in idx]
        lengths = torch.tensor([len(s) for s in batch])
        if int(lengths.max()) < 2:
            continue
        ids = pad_sequence(batch, batch_first=True, padding_value=pad_id).to(device)
        attn = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        logits = model(input_ids=ids, attention_mask=attn.to(device)).logits[:, :-1].float()
        target = ids[:, 1:]
        token_nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
        w = attn[:, 1:].to(token_nll.device, torch.float64)
        nll[idx] = (token_nll.double() * w).sum(1).cpu()
    return nll, counts
