"""LoRA on the reference model: low-rank updates of the linear weights, the base frozen.

`add_lora(model, rank, alpha, kinds, layers)` swaps those `nn.Linear`s for `LoRALinear` (same `weight`
Parameter, so `Transformer.param` and checkpoints keep their names; `lora_a`/`lora_b` are added). B starts at
zero: the adapted model starts as the base model. `base_only(model)` runs the base (the adapters switched off);
`adapter_pairs` and `save_adapter` write the m3lite adapter file (`m3lite.adapter`), `merge_lora` folds the
updates into the weights as the importer does.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m3lite.adapter import KINDS, SHAPE_FIELDS, write_adapter

from .model import Transformer


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        out_f, in_f = base.weight.shape
        a = torch.randn(rank, in_f, generator=generator) / math.sqrt(in_f)
        self.lora_a = nn.Parameter(a.to(base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(out_f, rank, device=base.weight.device))
        self.scale = alpha / rank
        self.active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.active:
            y = y + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scale
        return y


def _owner(model: Transformer, kind: str, layer: int) -> tuple[nn.Module, str]:
    b = model.layers[layer]
    return (b.attention, kind) if kind in ("wq", "wk", "wv", "wo") else (b.feed_forward, kind)


def add_lora(model: Transformer, rank: int, alpha: float, kinds: Iterable[str] = KINDS,
             layers: Iterable[int] | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Freeze every weight of `model` and add LoRA to `kinds` of `layers` (default all); returns the new
    trainable parameters."""
    kinds = list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or rank <= 0:
        raise ValueError(f"LoRA kinds must be among {KINDS} and the rank positive (got {bad}, rank {rank})")
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params = []
    for layer in (range(model.cfg.n_layers) if layers is None else layers):
        for kind in kinds:
            owner, name = _owner(model, kind, layer)
            lin = LoRALinear(getattr(owner, name), rank, alpha, g)
            setattr(owner, name, lin)
            params += [lin.lora_a, lin.lora_b]
    return params


def lora_modules(model: Transformer) -> Iterator[tuple[str, int, LoRALinear]]:
    for layer in range(model.cfg.n_layers):
        for kind in KINDS:
            m = getattr(_owner(model, kind, layer)[0], kind)
            if isinstance(m, LoRALinear):
                yield kind, layer, m


@contextlib.contextmanager
def base_only(model: Transformer):
    """Run the base model: every adapter off inside the block."""
    mods = [m for _, _, m in lora_modules(model)]
    for m in mods:
        m.active = False
    try:
        yield model
    finally:
        for m in mods:
            m.active = True


def adapter_pairs(model: Transformer) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    return {(kind, layer): (m.lora_a.detach().float().cpu().numpy(), m.lora_b.detach().float().cpu().numpy())
            for kind, layer, m in lora_modules(model)}


def save_adapter(model: Transformer, path, rank: int, alpha: float, base_name: str, training: dict,
                 dtype: str = "float16", retrieval_top_k: int | None = None) -> str:
    cfg = model.cfg
    meta = {"rank": rank, "alpha": alpha, "memory_layers": cfg.memory_layer_ids,
            "memory_tokens_per_head": cfg.memory_tokens_per_head, "retrieval_top_k": retrieval_top_k,
            "base": {**{f: getattr(cfg, f) for f in SHAPE_FIELDS}, "name": base_name}, "training": training}
    return write_adapter(path, adapter_pairs(model), meta, dtype=dtype)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and put plain Linears back (what the importer does with the file)."""
    for kind, layer, m in list(lora_modules(model)):
        w = m.weight
        w += (m.lora_b.float() @ m.lora_a.float() * m.scale).to(w.dtype)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight = w
        owner, name = _owner(model, kind, layer)
        setattr(owner, name, lin)
    return model
