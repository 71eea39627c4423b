"""One device parser for every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` is the first CUDA GPU when one is visible, else the CPU. Each command keeps its own
default (``build`` and ``distill``: auto; the others: cpu); the accepted spellings are the same
everywhere. torch is imported only when a device is resolved.
"""

from __future__ import annotations

import re

from tsdfm.models.errors import ConfigError

DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(device: str) -> str:
    """``device`` if it is one of auto, cpu, cuda, cuda:N; else a ConfigError naming them."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ConfigError(f"unknown device {device!r}; use {DEVICE_FORMS}")
    return device


def resolve_device(device: str) -> str:
    """The concrete device for ``device``: auto → cuda or cpu; a CUDA device needs a GPU.

    Returns "cpu", "cuda" or "cuda:N"; a ConfigError for an unknown spelling, for CUDA on a
    machine where none is visible, or for a GPU index beyond the visible ones.
    """
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but no CUDA GPU is visible; use --device cpu"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
            )
    return device
