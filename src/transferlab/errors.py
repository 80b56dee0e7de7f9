"""Exceptions that carry a message meant for the user: the command line prints them in one line."""


class TransferlabError(Exception):
    """Base class: the message names the file or parameter at fault and what to do about it."""


class ConfigError(TransferlabError, ValueError):
    """A parameter has a value we cannot use."""


class DataError(TransferlabError):
    """The data folder cannot be used as it is."""


class WeightsError(TransferlabError):
    """Pretrained weights cannot be found, read or matched to the architecture."""


class BundleError(TransferlabError):
    """A saved model bundle is missing, altered or from an unsupported format version."""


class ExportError(TransferlabError):
    """A model cannot be exported, or the exported model does not compute what the original does."""


def error_summary(error: Exception) -> str:
    """A converter's or exporter's exception in one line: its type and its message's first line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
