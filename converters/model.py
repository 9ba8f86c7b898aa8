"""The reference model: a Llama decoder in PyTorch, the single definition of m3lite's math.

The numba engine and the ONNX graph are checked against this file; when they disagree, this file wins.

    x = tok_embeddings[tokens]
    for each layer:
        h = x + wo(attention(rope(wq(norm(x))), rope(wk(norm(x))), wv(norm(x))))   # GQA, causal
        x = h + w2(silu(w1(norm(h))) * w3(norm(h)))                                  # SwiGLU
    logits = output(norm(x))            # output is tok_embeddings when the embeddings are tied

Conventions shared with the runtime:
- RMSNorm in fp32: x * rsqrt(mean(x^2) + eps) * w.
- RoPE "rotate half": inv_freq = theta^(-(0, 2, .., hd-2)/hd) computed in float64 and rounded to float32;
  angle = float32(position) * inv_freq in float32; cos/sin = cat(angle, angle); x*cos + rotate_half(x)*sin
  with rotate_half(x) = cat(-x2, x1) (x1, x2 the halves of the head dimension).
- GQA: query head h reads KV head h // (n_heads // n_kv_heads).
- Attention scores are q.k / sqrt(hd); keys in a KV cache are stored already rotated.
- Linear weights are [out_features, in_features]; no biases anywhere.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m3lite.config import ModelConfig
from m3lite.modelfile import tensor_shapes

KV = tuple[torch.Tensor, torch.Tensor]
LAYER_KINDS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")


def rope_inv_freq(hd: int, theta: float) -> np.ndarray:
    """RoPE inverse frequencies [hd/2], float32 (computed in float64 so every backend rounds alike)."""
    return (1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)


def rope_cos_sin(positions: torch.Tensor, hd: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + [hd], float32."""
    inv_freq = torch.from_numpy(rope_inv_freq(hd, theta)).to(positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, hd]; cos, sin [B or 1, T, hd]."""
    cos, sin = cos[:, None], sin[:, None]
    return (x.float() * cos + rotate_half(x.float()) * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.wq = nn.Linear(cfg.dim, cfg.q_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV | None,
                prefix: KV | None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.hd).transpose(1, 2)  # [B, KV, T, hd]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        P = k.shape[2] - T  # tokens already in the cache
        M = 0
        if prefix is not None:  # Memory3 memories: in front of the context, visible to every query
            M = prefix[0].shape[2]
            k = torch.cat((prefix[0].to(k.dtype), k), dim=2)
            v = torch.cat((prefix[1].to(v.dtype), v), dim=2)
        if P == 0 and M == 0:
            mask, causal = None, True
        else:
            # query j (new token index) sees the prefix, the past and new tokens 0..j
            cols = torch.arange(M + P + T, device=x.device)
            rows = torch.arange(T, device=x.device)[:, None] + M + P
            mask, causal = cols[None, :] <= rows, False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=1.0 / math.sqrt(self.hd),
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.wo(y), present


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, past, prefix):
        a, present = self.attention(self.attention_norm(x), cos, sin, past, prefix)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), present


class Transformer(nn.Module):
    """Llama decoder. `seed` initialises the weights like `converters.init.random_weights(cfg, seed)`
    (normal(0, 0.02) for linear and embedding weights, ones for norms); seed=None leaves torch's default init."""

    def __init__(self, cfg: ModelConfig, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied: the output projection reads tok_embeddings directly (no second Parameter to keep in sync).
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if seed is not None:
            self.init_weights(seed)

    def param(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """The parameter that holds layer `layer` of the stacked runtime tensor `kind`."""
        if layer is None:
            return {"tok_embeddings": self.tok_embeddings.weight, "norm": self.norm.weight,
                    "output": self.output.weight if self.output is not None else None}[kind]
        b = self.layers[layer]
        return {"attention_norm": b.attention_norm.weight, "ffn_norm": b.ffn_norm.weight,
                "wq": b.attention.wq.weight, "wk": b.attention.wk.weight, "wv": b.attention.wv.weight,
                "wo": b.attention.wo.weight, "w1": b.feed_forward.w1.weight, "w3": b.feed_forward.w3.weight,
                "w2": b.feed_forward.w2.weight}[kind]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        from .init import fill_random

        device = self.tok_embeddings.weight.device
        for p in self.parameters():
            if p.ndim == 1:
                p.fill_(1.0)

        def target(kind: str, layer: int | None) -> np.ndarray:
            return np.empty(tuple(self.param(kind, layer).shape), np.float32)

        for kind, layer, arr in fill_random(self.cfg, seed, target):
            self.param(kind, layer).copy_(torch.from_numpy(arr).to(device))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                past_kv: list[KV] | None = None, prefix_kv: dict[int, KV] | None = None,
                return_kv: bool = False):
        """tokens [B, T] -> logits [B, T, V] (and the per-layer (k, v) [B, n_kv, P+T, hd] with return_kv).

        positions: [T] or [B, T] absolute positions for RoPE (default: P..P+T-1 after P cached tokens).
        past_kv: per layer (k, v) [B, n_kv, P, hd], keys already rotated.
        prefix_kv: layer index -> (k, v) [B, n_kv, M, hd], rotated keys attended by every query without a
        causal mask, in front of past and new tokens (Memory3 memory attention); not part of the returned kv.
        """
        B, T = tokens.shape
        P = past_kv[0][0].shape[2] if past_kv else 0
        if positions is None:
            positions = torch.arange(P, P + T, device=tokens.device)
        if positions.ndim == 1:
            positions = positions[None]
        cos, sin = rope_cos_sin(positions, self.cfg.hd, self.cfg.rope_theta)
        x = self.tok_embeddings(tokens)
        presents: list[KV] = []
        for i, layer in enumerate(self.layers):
            past = past_kv[i] if past_kv else None
            prefix = prefix_kv.get(i) if prefix_kv else None
            x, present = layer(x, cos, sin, past, prefix)
            presents.append(present)
        x = self.norm(x)
        w_out = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = F.linear(x, w_out)
        return (logits, presents) if return_kv else logits


def to_stacked(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights as the runtime's stacked float32 tensors (names and shapes of tensor_shapes)."""
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    for name, shape in tensor_shapes(cfg).items():
        a = np.empty(shape, np.float32)
        if name in LAYER_KINDS:
            for i in range(cfg.n_layers):
                a[i] = model.param(name, i).detach().float().cpu().numpy()
        else:
            a[...] = model.param(name).detach().float().cpu().numpy()
        out[name] = a
    return out


def from_stacked(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Transformer:
    """A CPU float32 Transformer holding the given stacked tensors (e.g. `ModelFiles.open(dir).weights`)."""
    with torch.device("meta"):
        model = Transformer(cfg, seed=None)
    model = model.to_empty(device="cpu")
    want = tensor_shapes(cfg)
    if set(tensors) != set(want):
        raise ValueError(f"tensors do not match the config: missing {sorted(set(want) - set(tensors))}, "
                         f"extra {sorted(set(tensors) - set(want))}")
    with torch.no_grad():
        for name, shape in want.items():
            a = tensors[name]
            if tuple(a.shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(a.shape)}, expected {shape}")
            if name in LAYER_KINDS:
                for i in range(cfg.n_layers):
                    model.param(name, i).copy_(torch.from_numpy(np.array(a[i], np.float32)))
            else:
                model.param(name).copy_(torch.from_numpy(np.array(a, np.float32)))
    return model
