"""What an importer reads out of a pretrained checkpoint, whatever its format: the shape, the weights in the
runtime's layout (loaded one tensor at a time), the tokenizer and the chat template."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError
from ..modelfile import tensor_shapes

# the runtime's per-layer weight kinds, stacked over layers in a model directory
LAYER_KINDS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")


class CheckpointError(ModelFileError):
    """A checkpoint that cannot be imported: foreign architecture, missing tensor, truncated file, wrong shape."""


@dataclass
class Checkpoint:
    """A readable checkpoint.

    `tensor(name, layer)` returns one float32 tensor in the runtime's convention (Linear weights [out, in],
    RoPE "rotate half"): `layer` is an int for the per-layer kinds of LAYER_KINDS and None for
    tok_embeddings, norm and output. `tokenizer_json` is a Hugging Face tokenizer.json (text); `tokenizer_meta`
    holds the special ids (bos_id, add_bos, eos_ids, pad_id, ref_id, bos_token, eos_token) and `chat_template`
    the model's own template (None when it has none).
    """

    source: str
    config: ModelConfig
    tensor: Callable[[str, int | None], np.ndarray]
    tokenizer_json: str
    tokenizer_meta: dict[str, Any]
    chat_template: str | None
    info: dict[str, Any] = field(default_factory=dict)

    def stacked(self, progress: Callable[[int], None] | None = None) -> Mapping[str, np.ndarray]:
        """The weights as the stacked tensors of `tensor_shapes(config)`, each read when first asked for."""
        return _Stacked(self, progress)


class _Stacked(Mapping):
    def __init__(self, ck: Checkpoint, progress):
        self.ck, self.progress = ck, progress
        self.shapes = tensor_shapes(ck.config)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if name in LAYER_KINDS:
            out = np.empty(shape, np.float32)
            for i in range(shape[0]):
                out[i] = self._checked(name, i, shape[1:])
        else:
            out = self._checked(name, None, shape)
        return out

    def _checked(self, name: str, layer: int | None, shape: tuple[int, ...]) -> np.ndarray:
        a = np.asarray(self.ck.tensor(name, layer), dtype=np.float32)
        where = name if layer is None else f"layer {layer} {name}"
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{self.ck.source}: {where} has shape {tuple(a.shape)}, the config needs "
                               f"{tuple(shape)}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{self.ck.source}: {where} holds values that are not finite; the file is corrupt")
        if self.progress:
            self.progress(a.nbytes)
        return a


def permute_back(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: its converter interleaves each head's two RoPE halves (rows 0, hd/2, 1,
    hd/2+1, ...) for its own "interleaved pairs" kernels; the runtime rotates halves, as Hugging Face does."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_marker(meta: dict[str, Any], token_id: Callable[[str], int | None]) -> int:
    """The Memory3 reference marker of an imported model: a token it already has an embedding for.

    The model's BOS when it adds one (Llama 2/3: a reference then starts like every document did in
    pretraining), else its document separator <|endoftext|> (SmolLM2, GPT-2-style vocabularies: no BOS, but
    every pretraining document was separated by it), else the BOS or EOS token it has."""
    if meta.get("add_bos") and meta.get("bos_id", -1) >= 0:
        return int(meta["bos_id"])
    for text in ("<|endoftext|>", "<|end_of_text|>", "</s>"):
        i = token_id(text)
        if i is not None:
            return int(i)
    for key in ("bos_id", "eos_id"):
        if meta.get(key, -1) >= 0:
            return int(meta[key])
    return int(meta["eos_ids"][0])
