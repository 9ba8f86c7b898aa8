"""m3lite: a lightweight CPU runtime for small language models with explicit memory."""
import os as _os

# numba turns colorama on when imported for its error highlighting, which leaves a stray colour reset on the
# terminal at exit, NO_COLOR or not; m3lite's compiled code reports no numba errors to users
_os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")
# OpenBLAS's idle threads busy-wait 2^28 cycles (~0.1 s) after each GEMM: after a prefill they took the cores
# from the decode step's threads, halving the speed of the first ~100 tokens. 2^18 cycles (~0.1 ms) still
# bridges the gaps between a prefill's GEMMs. OpenBLAS reads it when numpy loads: import m3lite first.
# numba's OpenMP workers (libgomp) spin 300,000 pauses after each parallel region, ~5-10 ms on this AMD CPU:
# after a reply's last decode step they held a core while the next prompt's prefill wanted both for BLAS
# (prefill after decode ran at ~0.75x). 30,000 still spans the gap between two decode steps. libgomp reads it
# when numba first loads it.
_ENV_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "18", "GOMP_SPINCOUNT": "30000"}
# what m3lite set; `m3lite bench` runs its peers without them (M3LITE_KEEP_ENV=1: set nothing)
ENV_SET = () if _os.environ.get("M3LITE_KEEP_ENV") else tuple(k for k in _ENV_DEFAULTS if k not in _os.environ)
for _k in ENV_SET:
    _os.environ[_k] = _ENV_DEFAULTS[_k]

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
