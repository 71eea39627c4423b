"""User-facing errors. The CLI turns these into a one-line message and a non-zero exit."""


class TsdfmError(Exception):
    """Base class: a problem with the user's input that they can fix; the message says how."""


class ConfigError(TsdfmError):
    """A configuration value is invalid."""


class CheckpointError(TsdfmError):
    """A checkpoint is missing, malformed, pickled or incompatible."""


class DataError(TsdfmError):
    """Training or evaluation data is missing or malformed."""


class ShardError(DataError):
    """A dataset shard or manifest is missing, corrupt or breaks the dataset contract."""


class PathError(TsdfmError):
    """A path read from a file (a config, card, manifest or metadata) leaves its own folder."""
