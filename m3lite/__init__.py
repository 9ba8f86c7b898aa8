"""m3lite: a lightweight CPU runtime for small language models with explicit memory."""
from .config import ModelConfig
from .errors import M3Error

__version__ = "0.1.0"

__all__ = ["ModelConfig", "M3Error", "load", "Model", "Bank", "__version__"]


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
    raise AttributeError(name)
