"""Errors a user can cause. Each carries a one-line message that says what to do."""


class M3Error(Exception):
    """Base class: the CLI prints the message and exits with status 2, without a traceback."""


class ModelFileError(M3Error):
    """A model directory is missing, incomplete, corrupt or of an unknown format."""


class TokenizerError(M3Error):
    """The tokenizer file is missing or unusable."""


class BadArgument(M3Error):
    """An argument is out of range or inconsistent with the model."""


class BusyError(M3Error):
    """A model is already generating in another thread."""
