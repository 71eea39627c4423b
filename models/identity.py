"""A checkpoint's identity from its files, without building its module.

:func:`tsdfm.models.checkpoint.identity` hashes the canonical JSON of the parsed config and
then, in name order, each tensor's name, dtype (``str(torch.dtype)``), shape (``str(tuple)``) and
raw bytes. A safetensors file stores exactly those raw bytes (little-endian, row-major) after a
JSON header that names each tensor's dtype, shape and byte range, so the same digest is the
header read in name order and each tensor's byte range streamed through sha256: no tensor is
materialised and no ``nn.Module`` is built. The build driver computes the dataset's fingerprint
this way; only the actors load the models, each once.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tsdfm.models.checkpoint import (
    WEIGHTS_FILE,
    check_role,
    load_tokenizer,
    read_config,
    resolve,
)
from tsdfm.models.errors import CheckpointError
from tsdfm.models.flow_model import ModelConfig
from tsdfm.models.hashing import canonical_json

_CHUNK = 1 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

# safetensors dtype code → (str(torch.dtype), bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("torch.bool", 1),
    "U8": ("torch.uint8", 1),
    "I8": ("torch.int8", 1),
    "F8_E5M2": ("torch.float8_e5m2", 1),
    "F8_E4M3": ("torch.float8_e4m3fn", 1),
    "F8_E5M2FNUZ": ("torch.float8_e5m2fnuz", 1),
    "F8_E4M3FNUZ": ("torch.float8_e4m3fnuz", 1),
    "I16": ("torch.int16", 2),
    "U16": ("torch.uint16", 2),
    "F16": ("torch.float16", 2),
    "BF16": ("torch.bfloat16", 2),
    "I32": ("torch.int32", 4),
    "U32": ("torch.uint32", 4),
    "F32": ("torch.float32", 4),
    "I64": ("torch.int64", 8),
    "U64": ("torch.uint64", 8),
    "F64": ("torch.float64", 8),
    "C64": ("torch.complex64", 8),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data block."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class CheckpointFiles:
    """A checkpoint as its files: what the build driver needs of it, without its module.

    It has the attributes of :class:`tsdfm.models.checkpoint.Checkpoint` that the checks
    between teacher and compass read (``config``, ``spec``, ``identity``, ``directory``), so
    :func:`tsdfm.models.compass.check_compass_for_teacher` and
    :meth:`tsdfm.models.compass.ExactScorer.for_teacher` take it as they take a loaded one.
    """

    spec: str
    directory: Path
    config: ModelConfig
    identity: str


def safetensors_entries(path: Path, f: BinaryIO) -> tuple[int, list[TensorEntry]]:
    """(offset of the data block, tensors in name order) of the safetensors file open as ``f``.

    Raises CheckpointError naming the problem when the header is not a valid safetensors
    header for a file of this size.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a readable safetensors file ({what})")

    size = f.seek(0, 2)
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise bad("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise bad(f"header length {n} exceeds the file")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_size = size - 8 - n
    entries = []
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in SAFETENSORS_DTYPES
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) for o in info["data_offsets"])
        )
        if not ok:
            raise bad(f"tensor {name!r} lacks a known dtype, a shape or its data offsets")
        dtype, itemsize = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(info["shape"]) * itemsize:
            raise bad(f"tensor {name!r} has data offsets that do not fit its shape or the file")
        entries.append(TensorEntry(name, dtype, tuple(info["shape"]), begin, end))
    return 8 + n, entries


def weights_identity(config: dict[str, Any], weights: Path) -> str:
    """``sha256:<hex>`` of config + the tensors of the safetensors file ``weights``.

    The value of :func:`tsdfm.models.checkpoint.identity` for the same config and the state
    dict the file holds (see the module docstring), computed by streaming the file.
    """
    return tensors_identity(config, [weights])


def tensors_identity(config: dict[str, Any], files: list[Path]) -> str:
    """``sha256:<hex>`` of config + the tensors of one or more safetensors files.

    The tensors of all ``files`` (the shards of a sharded checkpoint) are hashed as one state
    dict, in name order: the digest does not depend on how the tensors are split into files,
    and for one file it is :func:`weights_identity`. A tensor name in two files is refused.
    """
    h = hashlib.sha256()
    h.update(canonical_json(config, "the checkpoint config", CheckpointError))
    handles: dict[Path, BinaryIO] = {}
    try:
        index: dict[str, tuple[Path, int, TensorEntry]] = {}
        for path in files:
            f = handles[path] = open(path, "rb")  # noqa: SIM115 (closed below)
            start, entries = safetensors_entries(path, f)
            for e in entries:
                if e.name in index:
                    raise CheckpointError(
                        f"tensor {e.name!r} is in both {index[e.name][0].name} and {path.name}; "
                        "a sharded checkpoint holds each tensor once"
                    )
                index[e.name] = (path, start, e)
        for name in sorted(index):
            path, start, e = index[name]
            f = handles[path]
            h.update(e.name.encode())
            h.update(e.dtype.encode())
            h.update(str(e.shape).encode())
            f.seek(start + e.begin)
            left = e.end - e.begin
            while left:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise CheckpointError(f"{path} is truncated inside tensor {e.name!r}")
                h.update(chunk)
                left -= len(chunk)
    except OSError as e:
        raise CheckpointError(
            f"{e.filename or files[0]} cannot be read ({e.strerror or e})"
        ) from None
    finally:
        for f in handles.values():
            f.close()
    return "sha256:" + h.hexdigest()


def checkpoint_files(
    spec: str | Path,
    role: str | tuple[str, ...] | None = None,
    check_tokenizer: bool = True,
) -> CheckpointFiles:
    """Resolve ``spec`` (directory or ``org/name[@rev]``), read its config, hash its files.

    The checks :func:`tsdfm.models.checkpoint.load_checkpoint` makes before it builds the
    module run here too, with its messages: pickles refused, config.json and
    model.safetensors present and readable, the role expected, and (``check_tokenizer``)
    tokenizer.json present and fitting the vocabulary. Whether the weights fit the
    architecture is known only by loading them into the module (the actors do).

    Args:
        spec: local directory or Hub repo id with optional revision.
        role: expected role(s); a checkpoint of another role is refused.
        check_tokenizer: also load tokenizer.json and check it against the config.
    """
    directory = resolve(spec)
    config = read_config(directory)
    check_role(spec, config, role)
    ident = weights_identity(config.to_dict(), directory / WEIGHTS_FILE)
    if check_tokenizer:
        load_tokenizer(directory, config)
    return CheckpointFiles(str(spec), directory, config, ident)


def checkpoint_identity(spec: str | Path) -> str:
    """The identity of the checkpoint at ``spec``, equal to ``load_checkpoint(spec).identity``."""
    return checkpoint_files(spec, check_tokenizer=False).identity
