"""``teacher import``: a pickled checkpoint → a safetensors checkpoint directory.

The pickle is read with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler,
which builds tensors and plain containers only and refuses any other object, so reading it
runs no code of the file. The state dict is found in the file (the top level, or under
``state_dict`` / ``model`` / ``ema`` / ``module``), an optional name prefix is stripped, and
the architecture is read from the tensor shapes where they hold it, from flags where they
don't (a state dict has no head count or sequence length).

Layouts:

* ``tsdfm``: this project's network (the FS-DFM teacher/student of ``tsdfm.models.flow_model``,
  time- and optionally step-size-conditioned). The result is a full checkpoint: the module is
  built from the inferred config and loads the state dict strictly, so the imported model is
  the pickled one (same tensors, same outputs).
* ``sedd``, ``fsdfm``: SEDD's and FS-DFM's released DiT state dicts. The tensors are stored
  unchanged in model.safetensors with a config.json naming the layout, but no adapter runs
  these networks yet, so a build refuses them with one line.

Every import records the source file's name and sha256 in the config (``provenance``).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tsdfm.models.checkpoint import PICKLE_SUFFIXES, read_tokenizer, save_checkpoint
from tsdfm.models.errors import CheckpointError
from tsdfm.models.hashing import file_sha256
from tsdfm.models.identity import weights_identity

LAYOUTS = ("tsdfm", "sedd", "fsdfm")
_WRAPPERS = ("state_dict", "model", "ema", "module")


@dataclass(frozen=True)
class ImportSpec:
    """What the command line adds to the file.

    Args:
        layout: tsdfm | sedd | fsdfm (module docstring).
        vocab_size: V data tokens; default: the output layer's rows.
        seq_len: L (required for tsdfm: not in a state dict).
        source: mask | uniform.
        n_heads: attention heads (required for tsdfm).
        scheduler: κ(t) of the teacher, ``linear`` or ``polynomial:N``.
        prefix: stripped from every tensor name (``module.``, ``backbone.``...).
    """

    layout: str = "tsdfm"
    vocab_size: int | None = None
    seq_len: int | None = None
    source: str = "mask"
    n_heads: int | None = None
    scheduler: str = "linear"
    prefix: str | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise CheckpointError(
                f"unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}"
            )


def read_state_dict(file: Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, read with ``torch.load(weights_only=True)``."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file} is not a file; give the .pth/.pt/.bin/.ckpt to import")
    if not file.name.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{file} is not a pickled checkpoint ({', '.join(PICKLE_SUFFIXES)}); a safetensors "
            "checkpoint needs no import"
        )
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "refused"
        raise CheckpointError(
            f"{file} holds objects other than tensors and plain containers, which "
            f"weights_only loading refuses ({first}); save the state dict alone "
            "(torch.save(model.state_dict(), ...)) and import that"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file} is not a readable torch checkpoint ({e})") from None
    state = _find_state_dict(obj)
    if state is None:
        raise CheckpointError(
            f"{file} holds no state dict of tensors (looked at the top level and under "
            f"{', '.join(_WRAPPERS)})"
        )
    if prefix:
        state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            found = _find_state_dict(obj.get(key))
            if found is not None:
                return found
    return None


def tsdfm_config(state: dict[str, torch.Tensor], spec: ImportSpec, provenance: dict):
    """This project's ModelConfig from a FlowModel state dict's shapes and ``spec``."""
    from tsdfm.models.backbone import BackboneConfig
    from tsdfm.models.flow_model import ModelConfig
    from tsdfm.models.path import parse_scheduler

    need = [k for k in ("backbone.tok.weight", "backbone.out.weight") if k not in state]
    if need:
        raise CheckpointError(
            f"the state dict lacks {', '.join(need)}: it is not this project's network; "
            "check --layout (and --prefix if its names carry one)"
        )
    if spec.seq_len is None or spec.n_heads is None:
        raise CheckpointError(
            "a state dict does not hold the sequence length and the head count; pass "
            "--seq-len and --n-heads"
        )
    vocab_in, d_model = state["backbone.tok.weight"].shape
    vocab_out = state["backbone.out.weight"].shape[0]
    V = spec.vocab_size or vocab_out
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))}
    mlp = state.get("backbone.blocks.0.mlp.0.weight")
    ada = state.get("backbone.blocks.0.ada.weight")
    backbone = BackboneConfig(
        vocab_in=int(vocab_in),
        vocab_out=int(vocab_out),
        max_len=spec.seq_len,
        d_model=int(d_model),
        n_layers=len(blocks),
        n_heads=spec.n_heads,
        mlp_ratio=int(mlp.shape[0] // d_model) if mlp is not None else 4,
        cond_dim=int(ada.shape[1]) if ada is not None else int(d_model),
        time_conditioning=any(k.startswith("backbone.time_emb.") for k in state),
        step_conditioning=any(k.startswith("backbone.step_emb.") for k in state),
    )
    role = "student" if backbone.step_conditioning else "teacher"
    return ModelConfig(
        role=role,
        source=spec.source,
        scheduler=parse_scheduler(spec.scheduler).to_dict(),
        vocab_size=V,
        special_tokens={"mask": V} if spec.source == "mask" else {},
        seq_len=spec.seq_len,
        backbone=backbone,
        data={"kind": "imported"},
        provenance=provenance,
    )


def import_checkpoint(
    file: Path, out: Path, spec: ImportSpec, tokenizer: Path | None = None
) -> dict[str, Any]:
    """Convert ``file`` into the checkpoint directory ``out`` (module docstring).

    Returns the report: source file and sha256, layout, tensors, identity, out.
    """
    file, out = Path(file), Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose another --out")
    state = read_state_dict(file, spec.prefix)
    source_sha = file_sha256(file)
    provenance = {"imported_from": file.name, "source_sha256": source_sha, "layout": spec.layout}
    tok = read_tokenizer(tokenizer) if tokenizer is not None else None
    if spec.layout == "tsdfm" and tok is None:
        raise CheckpointError(
            "this project's checkpoints carry their tokenizer: pass --tokenizer tokenizer.json "
            "(its vocabulary: the data tokens, then [MASK] under the mask source)"
        )
    if spec.layout == "tsdfm":
        from tsdfm.models.flow_model import FlowModel

        config = tsdfm_config(state, spec, provenance)
        with torch.random.fork_rng(devices=[]):
            model = FlowModel(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise CheckpointError(
                f"{file} does not fit the architecture read from it and the flags ({first}); "
                "check --n-heads and --seq-len"
            ) from None
        if tok is not None and tok.get_vocab_size() != config.input_vocab:
            raise CheckpointError(
                f"{tokenizer} has {tok.get_vocab_size()} tokens, the model {config.input_vocab}"
            )
        identity = save_checkpoint(out, model, tok)
    else:
        identity = _save_foreign(state, out, spec, provenance, tok)
    return {
        "source": str(file),
        "source_sha256": source_sha,
        "layout": spec.layout,
        "tensors": len(state),
        "out": str(out),
        "identity": identity,
    }


def _save_foreign(state, out: Path, spec: ImportSpec, provenance: dict, tok) -> str:
    """sedd / fsdfm: the tensors as they are, and a config.json naming the layout."""
    embed = next((v for k, v in state.items() if k.endswith("vocab_embed.embedding")), None)
    rows = int(embed.shape[0]) if embed is not None else None
    config = {
        "model_type": spec.layout,
        "format": "tsdfm-import",
        "vocab_size": spec.vocab_size or rows,
        "model_length": spec.seq_len,
        "source": spec.source,
        "n_heads": spec.n_heads,
        "provenance": provenance,
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok is not None:
            tok.save(str(tmp / "tokenizer.json"))
        identity = weights_identity(config, tmp / "model.safetensors")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return identity
