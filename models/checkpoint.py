"""Checkpoints: a directory with ``config.json``, ``model.safetensors`` and the tokenizer.

A checkpoint is referred to by a local directory or a Hub repo id with an optional revision
(``org/name@v1``). Pickled checkpoints (``.pt``, ``.bin``, ``.pkl``, ...) are refused: loading
them can execute arbitrary code.

Identity = sha256 over the canonical JSON of the config and every tensor (name, dtype, shape,
bytes, in name order). It does not depend on file layout or safetensors metadata, and every
dataset records the identities of the models that made it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tsdfm.models.errors import CheckpointError, TsdfmError
from tsdfm.models.flow_model import ModelConfig
from tsdfm.models.hashing import canonical_json
from tsdfm.models.paths import confined, staged_dir
from tsdfm.models.refs import parse_hub_ref
from tsdfm.models.roles import role_class

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# model code (*.py) is downloaded to be hashed and, with trust_remote_code only, run
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.md", "*.py", "*.model"]


def identity(config: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of config + weights, as ``sha256:<hex>``."""
    h = hashlib.sha256()
    h.update(canonical_json(config, "the checkpoint config", CheckpointError))
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + h.hexdigest()


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the module its role's class builds (``tsdfm.models.roles``: FlowModel for
            teacher/student, CompassModel for compass).
        config: parsed config.
        tokenizer: a ``tokenizers.Tokenizer`` or None when the directory has none.
        directory: where the files are.
        identity: sha256 of config and weights.
        spec: what the user passed (path or repo id with revision).
    """

    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Any
    directory: Path
    identity: str
    spec: str

    def file(self, name: str, what: str = "a file name") -> Path:
        """``directory / name``, refused (PathError) when it leads outside the directory."""
        return confined(self.directory, name, f"{what} of checkpoint {self.spec}")

    def data_file(self) -> Path | None:
        """The data file its ``config.json`` names in ``data.language`` (None if none)."""
        name = self.config.data.get("language")
        return self.file(name, f"{CONFIG_FILE} data.language") if name else None


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    tokenizer: Any | None = None,
    extra_files: dict[str, str | bytes | Path] | None = None,
) -> str:
    """Write a checkpoint directory atomically (temp dir, then rename). Returns its identity.

    Args:
        directory: destination; replaced if it exists.
        model: a module with ``.config`` (ModelConfig) and a state dict.
        tokenizer: a ``tokenizers.Tokenizer`` (saved as tokenizer.json) or None.
        extra_files: name → text/bytes/path of files to store beside the weights (e.g. the
            synthetic language's parameters).
    """
    directory = Path(directory)
    config = model.config.to_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    ident = identity(config, state)
    with staged_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "identity": ident})
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
        for name, content in (extra_files or {}).items():
            target = confined(tmp, name, f"extra file name of checkpoint {directory}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o644 if f.is_file() else 0o755)
    return ident


def resolve(spec: str | Path) -> Path:
    """Turn a local path or ``org/name[@revision]`` into a local checkpoint directory."""
    spec_str = str(spec)
    if spec_str.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(
            f"{spec_str} is a pickle file; pickled checkpoints are refused because loading them "
            "can run arbitrary code: use a directory with config.json + model.safetensors"
        )
    path = Path(spec_str).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"checkpoint {spec_str} is a file; pass the directory that holds config.json "
                "and model.safetensors"
            )
        return path
    ref = parse_hub_ref(spec_str)
    if ref is not None:
        owner = Path(ref.repo_id).parent
        if owner.is_dir():  # "runs/teacher" where runs/ exists: a path, not org/name
            raise CheckpointError(
                f"checkpoint {spec_str} not found: no such folder (the folder {owner} exists "
                f"here but holds no {path.name}, so this is read as a path, not a Hub id); "
                "check the path"
            )
        return _download(ref.repo_id, ref.revision)
    raise CheckpointError(
        f"checkpoint {spec_str} not found: give an existing directory or a Hub repo id "
        "like org/name[@revision]"
    )


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except RevisionNotFoundError:
        raise CheckpointError(
            f"revision {revision!r} of {repo_id} does not exist; check the tag or branch name"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Hub repo {repo_id} not found or not accessible; check the id and your HF token"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {repo_id}: {type(e).__name__}; check the network or "
            "HF_ENDPOINT, or pass a local directory"
        ) from None


def read_config(directory: Path) -> ModelConfig:
    config_path = directory / CONFIG_FILE
    if not (directory / WEIGHTS_FILE).exists():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{directory} holds only pickled weights ({', '.join(pickles)}); pickles are "
                "refused: convert them with `tsdfm-pipeline teacher import FILE --out DIR`"
            )
        raise CheckpointError(
            f"{directory} lacks {WEIGHTS_FILE}; a checkpoint directory needs config.json, "
            "model.safetensors and tokenizer.json"
        )
    if not config_path.exists():
        raise CheckpointError(
            f"{directory} lacks {CONFIG_FILE}; a checkpoint directory needs config.json, "
            "model.safetensors and tokenizer.json"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({e.msg} at line {e.lineno})"
        ) from None
    try:
        return ModelConfig.from_dict(raw)
    except TsdfmError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{config_path} has unexpected fields: {e}") from None


def read_tokenizer(path: Path):
    """``tokenizers.Tokenizer`` of ``path``, or a CheckpointError naming what is wrong."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} is not a readable tokenizer file ({first}); restore the tokenizer.json the "
            "model was saved with"
        ) from None


def load_tokenizer(directory: Path, config: ModelConfig):
    """Load tokenizer.json and check it against the model's vocabulary."""
    path = directory / TOKENIZER_FILE
    if not path.exists():
        raise CheckpointError(
            f"{directory} lacks {TOKENIZER_FILE}; save the tokenizer with the checkpoint"
        )
    tok = read_tokenizer(path)
    expected = config.input_vocab
    size = tok.get_vocab_size()
    unused_mask = config.source == "uniform" and tok.token_to_id("[MASK]") == config.vocab_size
    if size != expected and not (unused_mask and size == expected + 1):
        raise CheckpointError(
            f"tokenizer vocabulary ({tok.get_vocab_size()} tokens) does not match the model "
            f"({config.vocab_size} data tokens{' + [MASK]' if config.source == 'mask' else ''}"
            f" = {expected}); use the tokenizer the model was trained with"
        )
    mask_id = config.mask_token_id
    if mask_id is not None and tok.token_to_id("[MASK]") != mask_id:
        raise CheckpointError(
            f"tokenizer maps [MASK] to {tok.token_to_id('[MASK]')}, the model to {mask_id}; "
            "use the tokenizer the model was trained with"
        )
    return tok


def check_role(spec: str | Path, config: ModelConfig, role: str | tuple[str, ...] | None) -> None:
    """Refuse a checkpoint whose role is not one of ``role`` (None: any role)."""
    roles = (role,) if isinstance(role, str) else role
    if roles and config.role not in roles:
        raise CheckpointError(
            f"{spec} is a {config.role} checkpoint, but a {' or '.join(roles)} is needed here"
        )


def load_checkpoint(
    spec: str | Path,
    device: str | torch.device = "cpu",
    role: str | tuple[str, ...] | None = None,
) -> Checkpoint:
    """Load a checkpoint directory or Hub repo; refuse pickles; verify the tokenizer.

    A teacher of another family (a transformers masked LM, MDLM, Duo) loads with
    ``tsdfm.models.teachers.open_teacher``, which calls this for this project's format.

    Args:
        spec: local directory or ``org/name[@revision]``.
        device: where to put the weights.
        role: expected role(s); a checkpoint of another role is refused.
    """
    directory = resolve(spec)
    config = read_config(directory)
    check_role(spec, config, role)
    cls = role_class(config.role)  # registered: read_config refuses an unknown role
    with torch.random.fork_rng(devices=[]):  # the weights are loaded next: the caller's
        model = cls(config)  # global RNG must not move for an initialisation thrown away
    state = load_weights(model, directory)
    tokenizer = load_tokenizer(directory, config)
    ident = identity(config.to_dict(), state)
    model.to(device).eval()
    return Checkpoint(model, config, tokenizer, directory, ident, str(spec))


def load_weights(model: torch.nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """Load ``directory/model.safetensors`` into ``model`` (strictly); returns the state dict.
    A file that does not read, or weights that do not fit the config, is a CheckpointError."""
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} is not a readable safetensors file ({e})"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(
            f"weights in {directory} do not fit its config.json ({first})"
        ) from None
    return state


def bundled_path(name: str) -> Path:
    """Path of a checkpoint shipped with the package (``teacher`` or ``compass``)."""
    return Path(__file__).parent / "assets" / name
