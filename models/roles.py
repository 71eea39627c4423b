"""The role registry: which module class a checkpoint of each role loads into.

A checkpoint's ``config.json`` names its role (``tsdfm.models.flow_model.ModelConfig.role``);
``tsdfm.models.checkpoint.load_checkpoint`` builds ``role_class(role)(config)`` and loads the
weights into it. The built-in roles are registered where their classes are defined, in
``tsdfm.models.flow_model``: ``teacher`` and ``student`` (``FlowModel``) and ``compass``
(``CompassModel``). A new role is one call:

    register_role("critic", CriticModel)     # CriticModel(config) builds the module

This module is the bottom of the model layer: it imports nothing of the package but its errors,
so the config, the networks and the checkpoint loader can all consult it without a cycle.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tsdfm.models.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_CLASSES: dict[str, Callable[[Any], Any]] = {}


def register_role(role: str, cls: Callable[[Any], Any]) -> None:
    """Register the module class that a checkpoint of ``role`` loads into.

    Args:
        role: lower-case name (letters, digits, ``-`` and ``_``), as written in config.json.
        cls: ``cls(config)`` builds the ``nn.Module`` whose ``state_dict`` is what
            ``model.safetensors`` holds, given the checkpoint's ``ModelConfig``.

    Registering the same class again is a no-op; another class for a role already registered
    is refused (ConfigError), so a plug-in cannot silently replace a built-in role.
    """
    if not isinstance(role, str) or not _NAME.match(role):
        raise ConfigError(
            f"role name {role!r} must be lower-case letters, digits, '-' or '_', starting "
            "with a letter"
        )
    if not callable(cls):
        raise ConfigError(f"role {role!r}: {cls!r} is not a class (cls(config) builds the model)")
    known = _CLASSES.get(role)
    if known is not None and known is not cls:
        raise ConfigError(
            f"role {role!r} is already registered to {_label(known)}; pick another role name"
        )
    _CLASSES[role] = cls


def registered_roles() -> tuple[str, ...]:
    """The registered role names, sorted."""
    return tuple(sorted(_CLASSES))


def check_role(role: str) -> str:
    """``role`` if it is registered, else a one-line ConfigError naming the registered ones."""
    if role not in _CLASSES:
        raise ConfigError(
            f"unknown role {role!r}; registered roles: {', '.join(registered_roles())} "
            "(add one with tsdfm.models.roles.register_role)"
        )
    return role


def role_class(role: str) -> Callable[[Any], Any]:
    """The class registered for ``role`` (ConfigError naming the registered ones if none)."""
    return _CLASSES[check_role(role)]


def _label(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
