"""One parser for Hub references: ``org/name[@revision]``.

Checkpoints, datasets, ``verify`` targets, card links and ``publish`` all read a Hub id the
same way: ``org/name`` as ``huggingface_hub``'s own ``validate_repo_id`` accepts it (letters,
digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; not ending in ``.git``; at most 96
characters), with the namespace required (a bare ``name`` is a local path), and an optional
revision (a tag, branch or commit: letters, digits, ``_``, ``.``, ``-``, ``/``). Whether the
text is rather an existing local path is for the caller to decide first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REF_FORM = "org/name[@revision]"
MAX_REPO_ID_CHARS = 96
_REVISION = re.compile(r"[\w./-]+")


@dataclass(frozen=True)
class HubRef:
    """A Hub repository and an optional revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def is_repo_id(text: object) -> bool:
    """True iff ``text`` is ``org/name`` and huggingface_hub's ``validate_repo_id`` accepts it."""
    if not isinstance(text, str) or text.count("/") != 1 or len(text) > MAX_REPO_ID_CHARS:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def parse_hub_ref(text: object) -> HubRef | None:
    """``org/name[@revision]`` as a HubRef, or None when ``text`` does not have that form."""
    if not isinstance(text, str):
        return None
    repo_id, at, revision = text.partition("@")
    if not is_repo_id(repo_id) or (at and not _REVISION.fullmatch(revision)):
        return None
    return HubRef(repo_id, revision or None)
