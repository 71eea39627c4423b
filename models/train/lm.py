"""Train a small causal language model on the text corpus, to serve as an independent evaluator.

The model is a ``transformers`` Llama decoder p_φ(y_j | y_<j) over the project's byte-level BPE
tokens (the tokenizer of a text teacher, so it can read the teacher's samples without
retokenizing). The corpus is cut into windows w_{1:L} exactly as for the teacher
(``tsdfm.models.data.corpus``: one stream ``doc EOS doc EOS ...``, non-overlapping windows), each
window is prefixed with the start token y_0 = EOS, and the loss is

    ℓ(φ) = −(1/L) Σ_{j=1..L} log p_φ(w_j | EOS, w_<j)

averaged over a batch — the same framing the ``lm:`` evaluator scores samples with. This is a
different model and a different training run from any compass: it sees only real text, never
the teacher's states, and selects nothing.

The result (``OUT/final``) is a ``save_pretrained`` directory — ``config.json``,
``model.safetensors``, the tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` — plus
``tsdfm_lm.json`` (how it was trained, its held-out perplexity), loadable by
``AutoModelForCausalLM`` and by ``--evaluator lm:OUT/final`` or ``hf:OUT/final``. The loop is
``tsdfm.models.train.loop``'s (AdamW with no decay on biases, norm gains and embeddings,
warmup + cosine, clipping, no EMA). Resumable: trainer state (optimizer moments, RNG state,
step) is safetensors + JSON, never pickle, and a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tsdfm.models.causal_lm import PROJECT_LM_FILE
from tsdfm.models.data.corpus import (
    EOS_TOKEN,
    EOS_TOKEN_ID,
    CorpusConfig,
    TokenizedCorpus,
    _check_tokenizer,
    _digest,
    load_texts,
)
from tsdfm.models.data.synthetic import MASK_TOKEN
from tsdfm.models.errors import ConfigError, DataError
from tsdfm.models.extras import require
from tsdfm.models.paths import staged_dir
from tsdfm.models.train.common import check_run_config, seeded
from tsdfm.models.train.loop import Task, TrainLoop, loop_config
from tsdfm.models.train.trackers import check_available, parse_report_to

LM_FORMAT = "tsdfm-causal-lm"
LM_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LMTrainConfig:
    """A causal-LM training run.

    Args:
        out: run directory (checkpoints/, final/, metrics.jsonl, run_config.json).
        corpus: a .txt file or a folder of .txt files.
        tokenizer: a ``tokenizer.json`` file, or a folder holding one (a text teacher's
            checkpoint); EOS must be id 0 and [MASK] the last id, as ``data`` builds them.
        seq_len: L, tokens per training window (the LM takes L + 1 positions).
        d_model, n_layers, n_heads: model size (d_model divisible by n_heads).
        steps, batch_size, lr, warmup, weight_decay, grad_clip: optimisation (AdamW,
            β = (0.9, 0.95), no decay on biases, norm gains and embeddings, linear warmup
            then cosine decay to lr/10).
        holdout_fraction: share of windows held out for the held-out perplexity.
        heldout_windows: at most this many held-out windows are scored at each evaluation.
        checkpoint_every: steps between resumable checkpoints (the last 2 are kept).
        eval_every: steps between held-out evaluations.
        seed: seed of the initialisation, the split and the batch order.
        report_to: trackers that also get the metrics (``tsdfm.models.train.trackers``; not
            part of the run's identity).
    """

    out: str
    corpus: str
    tokenizer: str
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    holdout_fraction: float = 0.05
    heldout_windows: int = 256
    checkpoint_every: int = 250
    eval_every: int = 250
    seed: int = 0
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        check_available(self.report_to)
        for name in (
            "steps",
            "batch_size",
            "d_model",
            "n_layers",
            "n_heads",
            "heldout_windows",
            "checkpoint_every",
            "eval_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"lm {name}={getattr(self, name)} must be a positive integer")
        if self.seq_len < 2:
            raise ConfigError(f"lm seq_len must be >= 2, got {self.seq_len}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"lm d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if not self.lr > 0 or self.warmup < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise ConfigError("lm lr and grad_clip must be > 0, warmup and weight_decay >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"lm holdout_fraction must be in (0, 1), got {self.holdout_fraction}")

    def run_dict(self) -> dict:
        d = asdict(self)
        d.pop("out")
        d.pop("report_to")
        return d


@dataclass
class LMTrainResult:
    final_dir: Path
    steps: int
    final_loss: float
    heldout_nll: float
    heldout_ppl: float
    history: list[dict]


def load_project_tokenizer(spec: str | Path):
    """A project tokenizer (EOS = id 0, [MASK] = last id) from a tokenizer.json or a folder."""
    from tokenizers import Tokenizer

    p = Path(spec).expanduser()
    path = p / "tokenizer.json" if p.is_dir() else p
    if not path.is_file():
        raise DataError(
            f"no tokenizer at {spec}; pass a text teacher's checkpoint folder or a "
            "tokenizer.json written by this project"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{path} is not a tokenizer file ({e})") from None
    _check_tokenizer(tok)
    return tok


def lm_config(vocab_size: int, cfg: LMTrainConfig):
    """The ``transformers`` LlamaConfig of the LM: untied embeddings, no dropout, RoPE,
    L + 1 positions (the start token and the window)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.seq_len + 1,
        bos_token_id=EOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        use_cache=False,
    )


def window_nll(model: Any, windows: torch.Tensor) -> torch.Tensor:
    """(B, L) windows → (B, L) float32 −log p(w_j | EOS, w_<j)."""
    start = torch.full((windows.shape[0], 1), EOS_TOKEN_ID, dtype=torch.long)
    ids = torch.cat([start.to(windows.device), windows], 1)
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), windows.reshape(-1), reduction="none"
    ).view(windows.shape)


@torch.no_grad()
def heldout_nll(model: Any, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean NLL per token (nats) of held-out windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, windows.shape[0], batch_size):
        w = windows[lo : lo + batch_size].to(device)
        total += float(window_nll(model, w).double().sum())
        count += w.numel()
    model.train(was_training)
    return total / count


def train_lm(
    cfg: LMTrainConfig,
    progress: Callable[[int, int, dict], None] | None = None,
    device: str | torch.device = "cpu",
) -> LMTrainResult:
    """Train (or resume) the causal LM; returns where the final model is.

    Args:
        cfg: the run.
        progress: called as progress(step, total, metrics) after every step.
        device: where to train.
    """
    require("transformers", "text", "lm train")
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device(device)
    out = Path(cfg.out)
    tok = load_project_tokenizer(cfg.tokenizer)
    texts = load_texts(cfg.corpus)
    corpus = TokenizedCorpus.from_texts(texts, tok, CorpusConfig(cfg.seq_len), source=cfg.corpus)
    train, held = corpus.split(cfg.holdout_fraction, cfg.seed)
    data_info = {
        "source": cfg.corpus,
        "documents": corpus.num_documents,
        "stream_tokens": corpus.num_stream_tokens,
        "windows": len(corpus),
        "train_windows": len(train),
        "heldout_windows": len(held),
        "windows_sha256": _digest(corpus.windows),
        "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
    }
    out.mkdir(parents=True, exist_ok=True)
    check_run_config(
        out,
        {"run": cfg.run_dict(), "data": data_info},
        holds="an LM run",
        names={"data": "corpus or tokenizer"},
    )

    with seeded(cfg.seed):
        model = LlamaForCausalLM(lm_config(tok.get_vocab_size(), cfg))
    model.to(device).train()
    held_windows = held.windows[: cfg.heldout_windows]
    task = LMTask(model, train, held_windows, cfg.batch_size, device)
    run = TrainLoop(loop_config(cfg), task, out).run(progress)
    model.eval()
    nll = heldout_nll(model, held_windows, cfg.batch_size, device)
    meta = {
        "format": LM_FORMAT,
        "format_version": LM_FORMAT_VERSION,
        "trainer": "lm",
        "description": (
            "causal LM trained by `tsdfm-pipeline lm train` on real text only; each window "
            "w_1..w_L is scored as -log p(w_j | <|endoftext|>, w_<j)"
        ),
        "corpus": data_info,
        "run_config": cfg.run_dict(),
        "steps": cfg.steps,
        "heldout_nll": nll,
        "heldout_ppl": math.exp(nll),
        "heldout_windows_scored": int(held_windows.shape[0]),
    }
    final = out / "final"
    save_lm(final, model, tok, meta)
    return LMTrainResult(final, cfg.steps, run.last["loss"], nll, math.exp(nll), run.history)


class LMTask(Task):
    """One step: B training windows drawn uniformly (with replacement) from the run's
    generator; the loss is the mean of −log p_φ(w_j | EOS, w_<j) over them.

    Args:
        model: the LM being trained.
        train: the training windows (a ``TokenizedCorpus`` part).
        held_windows: (N, L) held-out windows scored at each evaluation.
        batch_size: B (also the evaluation's batch).
        device: where the LM runs.
    """

    name = "lm"

    def __init__(
        self,
        model: Any,
        train: TokenizedCorpus,
        held_windows: torch.Tensor,
        batch_size: int,
        device: torch.device,
    ):
        self.model, self.windows, self.held_windows = model, train, held_windows
        self.batch_size, self.device = batch_size, device

    def loss(self, step: int, gen: torch.Generator) -> torch.Tensor:
        w = self.windows.batch(self.batch_size, gen).to(self.device)
        return window_nll(self.model, w).mean()

    def evaluate(self) -> dict:
        return {
            "heldout_nll": heldout_nll(self.model, self.held_windows, self.batch_size, self.device)
        }

    def save(self, directory: Path) -> None:
        """Nothing beside the trainer state: an LM checkpoint is resumable state only."""
        directory.mkdir(parents=True, exist_ok=True)


def save_lm(directory: str | Path, model: Any, tokenizer: Any, meta: dict) -> Path:
    """Write a ``save_pretrained`` directory (safetensors) with the project tokenizer wrapped
    for ``AutoTokenizer`` and ``tsdfm_lm.json``; temp folder, then an atomic rename."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    with staged_dir(directory) as tmp:
        model.save_pretrained(tmp)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
            bos_token=EOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            mask_token=MASK_TOKEN,
        )
        fast.save_pretrained(tmp)
        (tmp / PROJECT_LM_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return directory
