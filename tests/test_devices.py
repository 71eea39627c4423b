"""tsdfm.models.devices: one accepted set of devices (auto, cpu, cuda, cuda:N) for every command."""

import pytest
import torch

from tsdfm.models.devices import check_device, resolve_device
from tsdfm.models.errors import ConfigError


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_accepted_devices(device):
    assert check_device(device) == device


@pytest.mark.parametrize("device", ["tpu", "gpu", "CPU", "cuda:", "cuda:x", "cuda1", "mps", ""])
def test_unknown_devices_name_the_accepted_set(device):
    with pytest.raises(ConfigError, match=r"use auto, cpu, cuda or cuda:N"):
        check_device(device)
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device(device)


def test_resolve_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA GPU is visible; use --device cpu"):
            resolve_device(device)


def test_resolve_with_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"only 2 CUDA GPU\(s\) are visible"):
        resolve_device("cuda:2")
