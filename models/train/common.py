"""Pieces shared by the trainers: learning-rate schedule, EMA, and pickle-free trainer state.

Trainer state (optimizer moments, EMA weights, RNG states, step) is written as one safetensors
file plus a JSON file, never with pickle, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.errors import CheckpointError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (parameter initialisation) under a fixed seed without touching the caller's
    global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def get_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine decay to
    ``min_ratio · base_lr`` at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters: θ̄ ← d_n·θ̄ + (1 − d_n)·θ after update n,
    with d_n = min(decay, (1 + n) / (10 + n)) so that early weights do not dominate short runs."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["__updates__"])
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``model``."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(backup[k].dtype) for k, v in self.shadow.items()})
        try:
            yield
        finally:
            model.load_state_dict(backup)


@dataclass
class TrainerState:
    """Everything needed to continue a run exactly."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    ema: dict[str, torch.Tensor] | None
    generators: dict[str, torch.Tensor]
    extra: dict[str, Any]


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for pid, slots in opt_state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = value.detach().contiguous().cpu()
                meta["state"][str(pid)][name] = "__tensor__"
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for pid, slots in meta["state"].items():
        state[int(pid)] = {
            name: tensors[f"optim/{pid}/{name}"] if value == "__tensor__" else value
            for name, value in slots.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_trainer_state(directory: Path, state: TrainerState) -> None:
    """Write trainer_state.{safetensors,json} into ``directory`` (JSON last, atomically)."""
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in state.model.items()}
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    tensors.update(opt_tensors)
    if state.ema is not None:
        tensors.update({f"ema/{k}": v.contiguous().cpu() for k, v in state.ema.items()})
    tensors.update({f"rng/{k}": v.contiguous().cpu() for k, v in state.generators.items()})
    save_file(tensors, str(directory / STATE_TENSORS))
    meta = {
        "step": state.step,
        "optimizer": opt_meta,
        "has_ema": state.ema is not None,
        "generators": sorted(state.generators),
        "extra": state.extra,
    }
    tmp = directory / (STATE_JSON + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / STATE_JSON)


def load_trainer_state(directory: Path) -> TrainerState:
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"trainer state in {directory} is unreadable ({e}); "
            "delete that checkpoint folder to resume from an earlier one"
        ) from None

    def pick(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return TrainerState(
        step=int(meta["step"]),
        model=pick("model/"),
        optimizer=_unflatten_optimizer(tensors, meta["optimizer"]),
        ema=pick("ema/") if meta["has_ema"] else None,
        generators=pick("rng/"),
        extra=meta.get("extra", {}),
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step-*`` folder of a run whose trainer state was written completely."""
    candidates = sorted(
        (p for p in run_dir.glob("checkpoints/step-*") if (p / STATE_JSON).exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return candidates[-1] if candidates else None


def resume_latest(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None
) -> TrainerState | None:
    """Load the newest complete checkpoint of ``run_dir`` into model, optimizer and EMA.

    Returns its state (step, generators, extra) for the caller's own RNGs and data position,
    or None when the run has no checkpoint yet.
    """
    resume_from = latest_checkpoint(run_dir)
    if resume_from is None:
        return None
    state = load_trainer_state(resume_from)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    if ema is not None and state.ema is not None:
        ema.load_state_dict(state.ema)
    return state
