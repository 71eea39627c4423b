"""Teachers of other families behind the solver's Denoiser protocol.

``--teacher`` may name this project's checkpoint or one of another family
(:mod:`tsdfm.models.teachers.families`): a transformers masked LM (BERT, RoBERTa,
ModernBERT), or a remote-code diffusion LM (MDLM, Duo) when ``trust_remote_code`` allows its
code to run. :func:`open_teacher` loads any of them as a
:class:`tsdfm.models.checkpoint.Checkpoint` whose ``model`` maps (x_t, t, h) to logits over the
V data tokens with [MASK] = V (:mod:`tsdfm.models.teachers.vocab`);
:func:`teacher_files` gives the same config and identity from the files alone, for the build
driver. Pickled weights never load here: ``tsdfm-pipeline teacher import`` converts them
(:mod:`tsdfm.models.teachers.convert`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tsdfm.models.checkpoint import CONFIG_FILE
from tsdfm.models.errors import CheckpointError

TSDFM_FORMAT = "tsdfm"


def is_adapter_checkpoint(directory: Path, teacher_format: str | None = None) -> bool:
    """Whether ``directory`` is read by an adapter rather than as this project's format.

    An explicit ``teacher_format`` decides; otherwise a config.json that names a
    transformers model (``model_type``, ``architectures`` or ``auto_map``) and is not this
    project's format. Anything else takes the project's loader (and its messages).
    """
    if teacher_format is not None:
        return teacher_format != TSDFM_FORMAT
    try:
        raw = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(raw, dict) or raw.get("format") == "tsdfm-checkpoint":
        return False
    return any(k in raw for k in ("model_type", "architectures", "auto_map"))


def open_teacher(
    spec,
    device="cpu",
    role: str | tuple[str, ...] | None = "teacher",
    teacher_format: str | None = None,
    trust_remote_code: bool = False,
    identity: str | None = None,
):
    """Load the teacher at ``spec`` (a directory or ``org/name[@rev]``) as a Checkpoint.

    This project's format loads with ``tsdfm.models.checkpoint.load_checkpoint``; a teacher
    of another family through its adapter (:func:`tsdfm.models.teachers.adapter.load`), its
    ``model`` then that adapter's denoiser.

    Args:
        spec: local directory or Hub repo id with optional revision.
        device: where to put the weights.
        role: expected role(s); an adapter teacher is always a ``teacher``.
        teacher_format: the family (:data:`tsdfm.models.teachers.families.FAMILIES`); None
            detects it from config.json.
        trust_remote_code: allow the checkpoint's own model code to run (MDLM, Duo).
        identity: the identity the files must have (what the build driver hashed); an adapter
            teacher whose files differ is refused before its network (or its code) is built.
    """
    from tsdfm.models.checkpoint import check_role, load_checkpoint, resolve

    directory = resolve(spec)
    if not is_adapter_checkpoint(directory, teacher_format):
        return load_checkpoint(spec, device, role=role)
    from tsdfm.models.teachers.adapter import load, plan

    p = plan(directory, str(spec), teacher_format, trust_remote_code)
    check_role(spec, p.config, role)
    if identity is not None and p.identity != identity:
        raise CheckpointError(
            f"teacher {spec} has identity {p.identity} here, {identity} where the build "
            "started: every node must see the same teacher files (a shared path, or a Hub id "
            "pinned @revision)"
        )
    return load(p, str(spec), device)


def teacher_files(
    spec,
    role: str | tuple[str, ...] | None = "teacher",
    teacher_format: str | None = None,
    trust_remote_code: bool = False,
    check_tokenizer: bool = True,
):
    """What :func:`open_teacher` gives without building the network: a
    ``tsdfm.models.identity.CheckpointFiles`` with the same config and identity (the build
    driver's view: every check the files allow, remote code refused without the flag)."""
    from tsdfm.models.checkpoint import check_role, resolve
    from tsdfm.models.identity import CheckpointFiles, checkpoint_files

    directory = resolve(spec)
    if not is_adapter_checkpoint(directory, teacher_format):
        return checkpoint_files(spec, role, check_tokenizer)
    from tsdfm.models.teachers.adapter import plan

    p = plan(directory, str(spec), teacher_format, trust_remote_code)
    check_role(spec, p.config, role)
    return CheckpointFiles(str(spec), directory, p.config, p.identity)


__all__ = ["TSDFM_FORMAT", "is_adapter_checkpoint", "open_teacher", "teacher_files"]
