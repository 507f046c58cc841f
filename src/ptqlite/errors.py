"""Errors a user can cause. Each carries one sentence that says what was wrong and what was expected."""


class PtqError(Exception):
    """Base class; the CLI prints the message without a traceback."""

    exit_code = 2


class ConfigError(PtqError):
    """The quantization config file is malformed or breaks a rule of docs/spec.md."""


class UsageError(PtqError):
    """A command-line flag is missing or has a bad value."""


class ModelError(PtqError):
    """The model file cannot be read or is not a model this tool handles."""


class DataError(PtqError):
    """Calibration or benchmark input data is missing or does not fit the model."""


class ConversionError(PtqError):
    """Quantization failed part way; nothing was written."""

    exit_code = 1


class OutputError(PtqError):
    """An output cannot be written there: a folder or special file in its place, no permission, a read-only or
    full file system. Nothing was written."""


class VerificationError(ConversionError):
    """The quantized model does not load or does not run in ONNX Runtime (the verification gate)."""
