"""Data-parallel training: the processes of one job (``torchrun``) and what they share.

A job of W processes (ranks) trains one model. Each rank holds a replica; rank r computes
the gradient of its own micro-batches and the replicas average them (DDP's all-reduce), so
with the job's A micro-batches per optimizer step split as A/W per rank,

    g_n = (1/W) Σ_r (W/A) Σ_{a ∈ rank r} ∇ℓ_{n,a} = (1/A) Σ_{a<A} ∇ℓ_{n,a},

the single-process gradient of the same A micro-batches (up to the order of the float sums).
Rank 0 alone writes checkpoints, metrics and the final model.

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


def check_split(world: World, grad_accum: int) -> int:
    """A/W, the micro-batches of each rank per optimizer step (A must be a multiple of W)."""
    if grad_accum % world.size:
        raise ConfigError(
            f"--grad-accum {grad_accum} cannot be split over {world.size} processes: the "
            "global batch (batch size × grad accum examples per step) is shared by the "
            f"processes; pass a --grad-accum that is a multiple of {world.size}"
        )
    return grad_accum // world.size
