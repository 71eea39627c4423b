"""Data-parallel training: the processes of one job (``torchrun``) and what they share.

A job of W processes (ranks) trains one model. Each rank holds a replica; rank r computes
the gradient of its own micro-batches and the replicas average them (DDP's all-reduce), so
with the job's A micro-batches per optimizer step split as A/W per rank,

    g_n = (1/W) Σ_r (W/A) Σ_{a ∈ rank r} ∇ℓ_{n,a} = (1/A) Σ_{a<A} ∇ℓ_{n,a},

the single-process gradient of the same A micro-batches (up to the order of the float sums).
Rank 0 alone writes checkpoints, metrics and the final model.

**Sharded mode** (``--fsdp``, FSDP2 ``fully_shard``) for a student that does not fit one
device: rank r holds only its 1/W slice (along the first axis) of every parameter, of its
gradient, of the AdamW moments and of the EMA, all in fp32 (the master weights). A block's
forward and backward all-gather its full weights for the time of that block; the gradients
are reduce-scattered, each rank receiving the average of its slice, so the update is the
same equation as above, applied slice by slice. A checkpoint is gathered in full
(:func:`full_model_state`, :func:`full_optimizer_state`) and written by rank 0 in the same
format as a one-process run, so sample, eval, publish and a resume on any world size read it
unchanged; on resume every rank reads the full state and keeps its own slice.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a job of one process
and nothing here does anything. The backend is gloo on the CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tsdfm.models.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes:
        rank: r, 0 ≤ r < size.
        size: W, the number of processes.
        local_rank: the rank on this machine (which GPU it uses).
        job: the job's id (torchrun's TORCHELASTIC_RUN_ID; the process id for a plain run).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    job: str = ""

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The job as torchrun describes it in the environment (one process without it)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local = int(env.get("LOCAL_RANK", str(rank)))
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} do not describe a job")
    job = f"pid-{os.getpid()}"
    if size > 1:  # the rendezvous: torchrun's run id and its master's address
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")
        job = f"{run_id}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    return World(rank, size, local, job)


def device_for(world: World, device: torch.device) -> torch.device:
    """The device of this rank: with several processes on CUDA, the GPU of its local rank."""
    if world.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return device


def init_process_group(world: World, device: torch.device) -> None:
    """Join the job's process group (gloo on the CPU, nccl on CUDA); nothing for one process."""
    if not world.distributed or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend)


def destroy_process_group(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def gather_objects(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-able), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(world: World, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def reduce_sum(world: World, values: list[float], device: torch.device) -> list[float]:
    """The sums over ranks of ``values`` (float64), on every rank."""
    return _all_reduce(world, values, device, torch.distributed.ReduceOp.SUM)


def reduce_max(world: World, values: list[float], device: torch.device) -> list[float]:
    """The maxima over ranks of ``values`` (float64), on every rank."""
    return _all_reduce(world, values, device, torch.distributed.ReduceOp.MAX)


def _all_reduce(world: World, values: list[float], device: torch.device, op) -> list[float]:
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=op)
    return t.tolist()


def check_sharding(world: World, fsdp: bool) -> None:
    """``--fsdp`` shards the model over the processes of a job: refused without one."""
    if fsdp and not world.distributed:
        raise ConfigError(
            "--fsdp shards the student over the processes of a distributed launch, but this is "
            "one process; start it with `torchrun --nproc_per_node=N -m tsdfm.pipeline.cli "
            "distill …` (N >= 2), or drop --fsdp"
        )


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of the outermost ``nn.ModuleList``s of ``model`` (its layers)."""
    out: list[torch.nn.Module] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if isinstance(module, torch.nn.ModuleList):
            taken.append(name)
            out.extend(module)
    return out


def shard_model(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over the job (FSDP2): each layer of its outermost module
    lists is one unit (its weights are all-gathered for its own forward and backward only),
    the rest of the model the root unit. Parameters stay fp32; bf16 is the model's autocast.

    Returns the model (its class is now also an ``FSDPModule``; parameters are DTensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded model, on the CPU of rank 0 (empty on the other
    ranks); every rank must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of optimizer parameter i (torch numbers them in param-group order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's unsharded state dict, numbered as ``opt.state_dict()`` numbers it (the
    format of a one-process run), on the CPU of rank 0 (empty elsewhere); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, opt, options=_full_options())
    if not by_name:
        return {}
    names = _param_names(model, opt)
    state = {i: by_name["state"][n] for i, n in enumerate(names) if n in by_name["state"]}
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def load_full_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict
) -> None:
    """Load full (unsharded) model and optimizer state dicts, present on every rank, into a
    sharded model and its optimizer: each rank keeps its own slices."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    names = _param_names(model, opt)
    by_name = {
        "state": {names[int(i)]: slots for i, slots in opt_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in opt_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, opt, by_name, options=options)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a DTensor; gathers: every rank calls it), on the
    CPU; any other tensor as it is, on the CPU."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut as ``like`` is (a DTensor: this rank's slice, with no communication, as
    every rank holds ``full``); ``full`` itself for any other ``like``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def check_split(world: World, grad_accum: int) -> int:
    """A/W, the micro-batches of each rank per optimizer step (A must be a multiple of W)."""
    if grad_accum % world.size:
        raise ConfigError(
            f"--grad-accum {grad_accum} cannot be split over {world.size} processes: the "
            "global batch (batch size × grad accum examples per step) is shared by the "
            f"processes; pass a --grad-accum that is a multiple of {world.size}"
        )
    return grad_accum // world.size
