"""Optional dependencies: a missing extra is one line naming the install, not a traceback.

The core install (``pip install tsdfm-pipeline``) is the trainer side; Ray comes with
``[build]``, transformers with ``[text]`` (see the README's "What to install").
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tsdfm.models.errors import ConfigError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise a ConfigError that names ``extra``'s install command.

    Args:
        module: the import name (``"transformers"``).
        extra: the package extra that installs it (``"text"``).
        what: what needs it, for the message (``"lm train"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"{what} needs {module}, which is not installed here ({e}); install it with "
            f"`pip install 'tsdfm-pipeline[{extra}]'`"
        ) from None
