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


def another_model(what: str, made_by: str, this_model: str, remedy: str) -> str:
    """The one-line message for a file made by another model than the one at hand (a bank, int8 weights, a saved
    conversation): `what` it is, both fingerprints, and the `remedy`."""
    return f"{what} was made by another model (fingerprint {made_by}, this model is {this_model}): {remedy}"
