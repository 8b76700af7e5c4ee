"""Error types raised by lmstack. Every message names the offending field, tensor or file."""


class LmstackError(Exception):
    """Base class of every error lmstack raises on bad input."""


class ConfigError(LmstackError, ValueError):
    """A configuration value is missing, malformed, unknown or out of range."""


class CheckpointError(LmstackError):
    """A checkpoint directory or file is missing, malformed, or does not match the model."""


class DataError(LmstackError, ValueError):
    """A corpus or tokenized dataset is missing, empty, malformed, or does not match the model."""


class NumericalError(LmstackError):
    """A computation produced NaN or inf: non-finite weights, or a diverged training run."""


class TokenizerError(LmstackError, ValueError):
    """A tokenizer file, component or argument is invalid; the message names it."""
