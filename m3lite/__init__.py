"""m3lite: a lightweight CPU runtime for small language models with explicit memory."""
import os as _os

# numba turns colorama on when imported for its error highlighting, which leaves a stray colour reset on the
# terminal at exit, NO_COLOR or not; m3lite's compiled code reports no numba errors to users
_os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")
# OpenBLAS's idle threads busy-wait 2^28 cycles (~0.1 s) after each GEMM: after a prefill they took the cores
# from the decode step's threads, halving the speed of the first ~100 tokens. 2^18 cycles (~0.1 ms) still
# bridges the gaps between a prefill's GEMMs. OpenBLAS reads it when numpy loads: import m3lite first.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")

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
