"""m3lite: a lightweight CPU runtime for small language models with explicit memory."""
import os as _os

# numba turns colorama on when imported for its error highlighting, which leaves a stray colour reset on the
# terminal at exit, NO_COLOR or not; m3lite's compiled code reports no numba errors to users
_os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")

from .config import ModelConfig
from .errors import M3Error

__version__ = "0.1.0"

__all__ = ["ModelConfig", "M3Error", "load", "Model", "Bank", "Chat", "__version__"]


def load(model_dir, **kwargs):
    """Load a model directory; see `m3lite.model.Model`."""
    from .model import Model

    return Model.load(model_dir, **kwargs)


def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    if name == "Bank":
        from .bank import Bank

        return Bank
    if name == "Chat":
        from .chat import Chat

        return Chat
    raise AttributeError(name)
