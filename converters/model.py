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

Explicit memory (Memory3; the second half of this file, from `Memory` on):
- `encode_memory`: a reference (<ref> + up to reference_max_tokens-1 text tokens) runs through the layers up to
  the last memory layer; per memory layer and KV head the `memory_tokens_per_head` text tokens with the highest
  selection score (`memory_scores`: attention received from the text tokens of the head's query group, no causal
  mask, no RoPE) are kept, with their rotated keys and values.
- `ref_kv`: the <ref> token's key/value at each memory layer (position 0), shared by every chunk.
- `forward_with_memory`: the context (RoPE positions reference_max_tokens + index) in chunks of
  retrieval_interval tokens; at memory layers each chunk attends to <ref>, its retrieved memories, then the
  causal context; other layers see the causal context only.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from m3lite.config import ModelConfig
from m3lite.kernels.rope import rope_inv_freq
from m3lite.modelfile import tensor_shapes

from .tokenizer import REF

KV = tuple[torch.Tensor, torch.Tensor]
# A prefix for one layer: (k, v) [B, n_kv, M, hd], optionally with a boolean visibility mask (see Transformer.forward).
Prefix = tuple[torch.Tensor, ...]
LAYER_KINDS = ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")


def rope_cos_sin(positions: torch.Tensor, hd: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + [hd], float32."""
    inv_freq = torch.from_numpy(rope_inv_freq(hd, theta, scaling)).to(positions.device)
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

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, hd], k, v [B, n_kv, T, hd] of the (normed) input x [B, T, dim], before RoPE."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.hd).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: KV | None,
                prefix: Prefix | None) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        present = (k, v)
        P = k.shape[2] - T  # tokens already in the cache
        M = 0
        prefix_mask = None
        if prefix is not None:  # Memory3 memories: in front of the context, visible to every query
            M = prefix[0].shape[2]
            k = torch.cat((prefix[0].to(k.dtype), k), dim=2)
            v = torch.cat((prefix[1].to(v.dtype), v), dim=2)
            if len(prefix) > 2 and prefix[2] is not None:
                prefix_mask = self._heads_mask(prefix[2], B, T, M)
        if P == 0 and M == 0:
            mask, causal = None, True
        else:
            # query j (new token index) sees the prefix, the past and new tokens 0..j
            cols = torch.arange(M + P + T, device=x.device)
            rows = torch.arange(T, device=x.device)[:, None] + M + P
            mask, causal = cols[None, :] <= rows, False
            if prefix_mask is not None:  # padded memory slots: hide them ([B, H, T, M] in front of the causal part)
                context = mask[:, M:].expand(B, self.n_heads, T, P + T)
                mask = torch.cat((prefix_mask, context), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=1.0 / math.sqrt(self.hd),
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.wo(y), present

    def _heads_mask(self, m: torch.Tensor, B: int, T: int, M: int) -> torch.Tensor:
        """A prefix mask [B, M] or [B, n_kv or 1, T or 1, M] (True = visible) as [B, H, T, M]."""
        if m.dtype != torch.bool:
            raise ValueError(f"prefix mask must be boolean, got {m.dtype}")
        if m.ndim == 2:
            m = m[:, None, None, :]
        if m.ndim != 4 or m.shape[1] not in (1, self.n_kv_heads) or m.shape[2] not in (1, T) or m.shape[3] != M:
            raise ValueError(f"prefix mask shape {tuple(m.shape)} is not [B, M] or [B, n_kv|1, T|1, M] "
                             f"with n_kv={self.n_kv_heads}, T={T}, M={M}")
        if m.shape[1] > 1:  # KV head g -> its query heads g*r .. g*r+r-1 (the GQA grouping)
            m = m.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        return m.expand(B, self.n_heads, T, M)


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
        # the token that starts every reference: <ref> for models trained here; an imported model's own marker
        # (its tokenizer's ref_id, see m3lite.importers.checkpoint.reference_marker)
        self.ref_id = REF
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
        from .random_init import fill_random

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
                past_kv: list[KV] | None = None, prefix_kv: dict[int, Prefix] | None = None,
                return_kv: bool = False):
        """tokens [B, T] -> logits [B, T, V] (and the per-layer (k, v) [B, n_kv, P+T, hd] with return_kv).

        positions: [T] or [B, T] absolute positions for RoPE (default: P..P+T-1 after P cached tokens).
        past_kv: per layer (k, v) [B, n_kv, P, hd], keys already rotated.
        prefix_kv: layer index -> (k, v) [B, n_kv, M, hd], rotated keys attended by every query without a
        causal mask, in front of past and new tokens (Memory3 memory attention); not part of the returned kv.
        A third element, a boolean mask [B, M] or [B, n_kv or 1, T or 1, M] (True = visible), hides prefix
        slots: padded memory slots, per KV head, or per query (the single-pass chunked memory attention).
        Every query must still see at least one key (it always sees itself).
        """
        B, T = tokens.shape
        P = past_kv[0][0].shape[2] if past_kv else 0
        if positions is None:
            positions = torch.arange(P, P + T, device=tokens.device)
        if positions.ndim == 1:
            positions = positions[None]
        cos, sin = rope_cos_sin(positions, self.cfg.hd, self.cfg.rope_theta, self.cfg.rope_scaling)
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


# ---------------------------------------------------------------------------------------- explicit memory


@dataclass
class Memory:
    """Explicit memories of R references (the output of `encode_memory`).

    keys, values [R, Lm, n_kv, K, hd]: per memory layer (Lm = len(cfg.memory_layer_ids), in that order) and KV
        head, the K = cfg.memory_tokens_per_head kept tokens, sorted by position; keys carry RoPE for their
        position in the reference. Slots at or beyond `counts` are zero.
    positions [R, Lm, n_kv, K] int64: each slot's position in its reference (1..len-1); 0 for unused slots.
    counts [R, Lm, n_kv] int64: valid slots (min(K, number of text tokens); equal across layers and heads for
        encode_memory's output, kept per head so that other producers may differ).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    counts: torch.Tensor

    def __len__(self) -> int:
        return self.keys.shape[0]

    def __getitem__(self, idx) -> "Memory":
        """The memories of some references, as a Memory (an int keeps the reference dimension)."""
        if isinstance(idx, int):
            idx = [idx]
        return Memory(self.keys[idx], self.values[idx], self.positions[idx], self.counts[idx])

    def to(self, device) -> "Memory":
        return Memory(self.keys.to(device), self.values.to(device), self.positions.to(device),
                      self.counts.to(device))

    def detach(self) -> "Memory":
        return Memory(self.keys.detach(), self.values.detach(), self.positions, self.counts)

    def slot_mask(self) -> torch.Tensor:
        """[R, Lm, n_kv, K] bool: True for the valid slots (slot < counts)."""
        K = self.keys.shape[3]
        return torch.arange(K, device=self.counts.device) < self.counts[..., None]

    @staticmethod
    def cat(memories: Sequence["Memory"]) -> "Memory":
        """Concatenate along the reference dimension."""
        return Memory(*(torch.cat([getattr(m, f) for m in memories]) for f in
                        ("keys", "values", "positions", "counts")))


def memory_scores(q: torch.Tensor, k: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Memory3 token-selection scores, float32 [B, n_kv, T].

    q [B, H, T, hd] and k [B, n_kv, T, hd] are one layer's query and key projections of a batch of references
    BEFORE RoPE; text [B, T] bool marks the text tokens of each reference (positions 1..len-1: not <ref>, not
    padding). For KV head g and key token j:

        score[g, j] = sum over query heads h with h // (H // n_kv) == g, and over text tokens i, of
                      softmax over text tokens j' of (q[h, i] . k[g, j'] / sqrt(hd)), taken at j' = j

    i.e. the total attention that token j receives from the text of the reference at the heads that share
    KV head g, computed without causal mask and without positional encoding (the paper's definition; its code
    approximates it with unnormalised exp(q.k), which we do not). Computed in float32 whatever the model
    dtype. Entries that are not text tokens are -inf (never selected). Not differentiable on purpose (the
    choice of tokens is discrete); call it on detached tensors or under no_grad.
    """
    B, H, T, hd = q.shape
    G = k.shape[1]
    q = q.float().reshape(B, G, H // G, T, hd)  # heads g*r .. g*r+r-1 share KV head g
    s = torch.einsum("bgrid,bgjd->bgrij", q, k.float()) / math.sqrt(hd)
    s = s.masked_fill(~text[:, None, None, None, :], float("-inf"))
    # A reference with no text has only -inf rows (NaN after softmax); no query counts there, `where` drops them.
    p = torch.where(text[:, None, None, :, None], torch.softmax(s, dim=-1), 0.0)
    score = p.sum(dim=(2, 3))
    return score.masked_fill(~text[:, None, :], float("-inf"))


def select_tokens(score: torch.Tensor, n_text: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept tokens for scores [B, n_kv, T] (from `memory_scores`): positions [B, n_kv, K] int64 and valid
    [B, n_kv, K] bool.

    The top min(K, n_text) scores per head; equal scores prefer the lower position (a stable sort); the kept
    positions are sorted ascending and fill the first slots; the remaining slots are invalid, position 0.
    """
    B, G, T = score.shape
    kk = min(K, T)
    top = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :kk]
    count = n_text.clamp(max=K)
    valid = torch.arange(kk, device=score.device) < count[:, None, None]
    # invalid slots get position T so that sorting moves them behind the kept ones
    top = torch.where(valid, top, T).sort(dim=-1).values
    top = torch.where(valid, top, 0)
    if kk < K:
        top = F.pad(top, (0, K - kk))
        valid = F.pad(valid, (0, K - kk))
    return top, valid


def _check_references(cfg: ModelConfig, ref_tokens: torch.Tensor, lengths: torch.Tensor, ref_id: int) -> None:
    if ref_tokens.ndim != 2 or lengths.shape != (ref_tokens.shape[0],):
        raise ValueError(f"expected ref_tokens [B, T] and lengths [B], got {tuple(ref_tokens.shape)} and "
                         f"{tuple(lengths.shape)}")
    B, T = ref_tokens.shape
    if B == 0:
        return
    if int(lengths.min()) < 1 or int(lengths.max()) > min(T, cfg.reference_max_tokens):
        raise ValueError(f"reference lengths must be in 1..{min(T, cfg.reference_max_tokens)} (<ref> included; "
                         f"T={T}, reference_max_tokens={cfg.reference_max_tokens})")
    if bool((ref_tokens[:, 0] != ref_id).any()):
        raise ValueError(f"every reference must start with the <ref> marker (id {ref_id})")


def encode_memory(model: Transformer, ref_tokens: torch.Tensor, lengths: torch.Tensor) -> Memory:
    """Encode a batch of references into explicit memories (Memory3 sparsified key/values).

    ref_tokens [B, T] int64: row b is <ref> (id 4) followed by lengths[b]-1 text tokens, then padding (any id;
        pad is 3 by convention) up to T. lengths [B]: real tokens per row, <ref> included,
        1 <= lengths <= min(T, cfg.reference_max_tokens).

    The references run through layers 0..max(memory_layer_ids) exactly as in `Transformer.forward` (causal
    attention, RoPE at positions 0..T-1, no past, no prefix; right padding cannot reach real tokens through
    the causal mask, so a row's memory does not depend on T or on the other rows). At each memory layer the
    selection score of every text token (`memory_scores`, from that layer's pre-RoPE q and k, fp32) picks
    K = cfg.memory_tokens_per_head tokens per KV head (`select_tokens`); their keys as the layer used them
    (rotated at their position) and their values are gathered. Layers after the last memory layer never run.

    Gradients flow into the kept keys and values (so into the weights of the layers up to each memory layer);
    the selection itself is computed without gradient. Works on any device and dtype (scores in fp32,
    keys/values in the model's dtype).
    """
    cfg = model.cfg
    layer_ids = cfg.memory_layer_ids
    K = cfg.memory_tokens_per_head
    device = ref_tokens.device
    lengths = torch.as_tensor(lengths, device=device).long()
    _check_references(cfg, ref_tokens, lengths, model.ref_id)
    B, T = ref_tokens.shape
    pos = torch.arange(T, device=device)
    cos, sin = rope_cos_sin(pos[None], cfg.hd, cfg.rope_theta, cfg.rope_scaling)
    text = (pos[None] >= 1) & (pos[None] < lengths[:, None])  # [B, T]: queries and candidate keys
    n_text = lengths - 1

    x = model.tok_embeddings(ref_tokens)
    keys, values, positions = [], [], []
    for i in range(max(layer_ids) + 1):
        layer = model.layers[i]
        if i in layer_ids:
            with torch.no_grad():
                q, k, _ = layer.attention.project(layer.attention_norm(x))
                chosen, valid = select_tokens(memory_scores(q, k, text), n_text, K)
        x, (k_rot, v) = layer(x, cos, sin, None, None)
        if i in layer_ids:
            idx = chosen[..., None].expand(-1, -1, -1, cfg.hd)
            keys.append(torch.gather(k_rot, 2, idx).masked_fill(~valid[..., None], 0.0))
            values.append(torch.gather(v, 2, idx).masked_fill(~valid[..., None], 0.0))
            positions.append(chosen)
    counts = n_text.clamp(max=K)[:, None, None].expand(B, len(layer_ids), cfg.n_kv_heads).contiguous()
    return Memory(torch.stack(keys, 1), torch.stack(values, 1), torch.stack(positions, 1), counts)


def ref_kv(model: Transformer) -> KV:
    """The <ref> token's key and value at every memory layer: k, v [Lm, n_kv, 1, hd], key rotated at position 0.

    Causal attention makes them the same for every reference (the <ref> row of any `encode_memory` run), so
    they are computed once from <ref> alone. Differentiable; recompute after the weights change.
    """
    cfg = model.cfg
    layer_ids = cfg.memory_layer_ids
    tok = torch.full((1, 1), model.ref_id, dtype=torch.long, device=model.tok_embeddings.weight.device)
    cos, sin = rope_cos_sin(torch.zeros(1, 1, dtype=torch.long, device=tok.device), cfg.hd, cfg.rope_theta,
                            cfg.rope_scaling)
    x = model.tok_embeddings(tok)
    ks, vs = [], []
    for i in range(max(layer_ids) + 1):
        x, (k, v) = model.layers[i](x, cos, sin, None, None)
        if i in layer_ids:
            ks.append(k[0])
            vs.append(v[0])
    return torch.stack(ks), torch.stack(vs)


def _is_memory(m) -> bool:
    """A Memory, or any object with keys/values/counts arrays (numpy accepted: the runtime's memories)."""
    return isinstance(m, Memory) or all(hasattr(m, f) and not callable(getattr(m, f))
                                        for f in ("keys", "values", "counts"))


def _as_memory(m, device) -> Memory | None:
    if m is None:
        return None
    t = [torch.as_tensor(getattr(m, f), device=device) for f in ("keys", "values", "counts")]
    pos = getattr(m, "positions", None)
    pos = torch.zeros(t[0].shape[:4], dtype=torch.long, device=device) if pos is None else \
        torch.as_tensor(pos, device=device)
    return Memory(t[0], t[1], pos, t[2].long())


def _chunk_slots(cfg: ModelConfig, memories, B: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's memory slots for each sequence: k, v [B, Lm, n_kv, M, hd] and visible [B, Lm, n_kv, M],
    the references of a sequence one after the other (K slots each, padded ones invisible); sequences with
    fewer references are padded with invisible slots up to the longest."""
    Lm, G, hd = len(cfg.memory_layer_ids), cfg.n_kv_heads, cfg.hd
    if memories is None or _is_memory(memories):
        per_seq = [memories] * B
    else:
        per_seq = list(memories)
        if len(per_seq) != B:
            raise ValueError(f"a chunk's per-sequence memories must have one entry per sequence ({B}), "
                             f"got {len(per_seq)}")
    ks, vs, ms = [], [], []
    for m in per_seq:
        m = _as_memory(m, device)
        if m is None or len(m) == 0:
            ks.append(None)
            vs.append(None)
            ms.append(None)
            continue
        R, Lm_, G_, K, hd_ = m.keys.shape
        if (Lm_, G_, hd_) != (Lm, G, hd):
            raise ValueError(f"memory keys {tuple(m.keys.shape)} do not fit this model: expected "
                             f"[R, {Lm}, {G}, K, {hd}]")
        # [R, Lm, G, K, hd] -> [Lm, G, R*K, hd]: reference r's slots are r*K .. r*K+K-1
        ks.append(m.keys.permute(1, 2, 0, 3, 4).reshape(Lm, G, R * K, hd))
        vs.append(m.values.permute(1, 2, 0, 3, 4).reshape(Lm, G, R * K, hd))
        ms.append(m.slot_mask().permute(1, 2, 0, 3).reshape(Lm, G, R * K))
    M = max((k.shape[2] for k in ks if k is not None), default=0)
    dtype = next((k.dtype for k in ks if k is not None), torch.float32)
    k_out = torch.zeros(B, Lm, G, M, hd, dtype=dtype, device=device)
    v_out = torch.zeros(B, Lm, G, M, hd, dtype=dtype, device=device)
    m_out = torch.zeros(B, Lm, G, M, dtype=torch.bool, device=device)
    if M == 0:
        return k_out, v_out, m_out
    # built by concatenation (not in-place writes) so gradients reach the memories
    ks = [k.to(dtype) if k is not None else k_out[0, :, :, :0] for k in ks]
    vs = [v.to(dtype) if v is not None else v_out[0, :, :, :0] for v in vs]
    ms = [m if m is not None else m_out[0, :, :, :0] for m in ms]
    k_out = torch.stack([F.pad(k, (0, 0, 0, M - k.shape[2])) for k in ks])
    v_out = torch.stack([F.pad(v, (0, 0, 0, M - v.shape[2])) for v in vs])
    m_out = torch.stack([F.pad(m, (0, M - m.shape[2]), value=False) for m in ms])
    return k_out, v_out, m_out


def memory_prefix(model: Transformer, memories, batch_size: int, ref: KV | None = None) -> dict[int, Prefix]:
    """The `prefix_kv` for one chunk: memory layer id -> (k, v [B, n_kv, 1+M, hd], visible [B, n_kv, 1, M+1]).

    memories: None, a Memory shared by every sequence, or a list of one Memory/None per sequence. Slot 0 is
    the <ref> key/value (`ref_kv`, always visible, also when nothing was retrieved), then each sequence's
    references in the given order, K slots each (slots at or beyond counts hidden). ref: a precomputed
    `ref_kv(model)`.
    """
    cfg = model.cfg
    device = model.tok_embeddings.weight.device
    rk, rv = ref_kv(model) if ref is None else ref
    k, v, vis = _chunk_slots(cfg, memories, batch_size, device)
    B, Lm, G = batch_size, len(cfg.memory_layer_ids), cfg.n_kv_heads
    k = torch.cat((rk[None].expand(B, -1, -1, -1, -1).to(k.dtype), k), dim=3)
    v = torch.cat((rv[None].expand(B, -1, -1, -1, -1).to(v.dtype), v), dim=3)
    vis = torch.cat((torch.ones(B, Lm, G, 1, dtype=torch.bool, device=device), vis), dim=3)
    return {layer: (k[:, li], v[:, li], vis[:, li, :, None, :]) for li, layer in enumerate(cfg.memory_layer_ids)}


def _per_chunk(memories, n_chunks: int) -> list:
    if memories is None or _is_memory(memories):
        return [memories] * n_chunks
    memories = list(memories)
    if len(memories) != n_chunks:
        raise ValueError(f"got memories for {len(memories)} chunks, the tokens make {n_chunks}")
    return memories


def _chunk_plan(model: "Transformer", tokens: torch.Tensor, memories, chunk: int | None, pos_offset: int | None):
    """The chunking both memory forwards share: (chunk, pos_offset, B, T, n_chunks, memories per chunk)."""
    cfg = model.cfg
    chunk = cfg.retrieval_interval if chunk is None else chunk
    pos_offset = cfg.reference_max_tokens if pos_offset is None else pos_offset
    B, T = tokens.shape
    if chunk <= 0 or T == 0:
        raise ValueError("forward_with_memory needs chunk > 0 and at least one token")
    n_chunks = -(-T // chunk)
    return chunk, pos_offset, B, T, n_chunks, _per_chunk(memories, n_chunks)


def forward_with_memory(model: Transformer, tokens: torch.Tensor, memories, chunk: int | None = None,
                        pos_offset: int | None = None, past_kv: list[KV] | None = None, return_kv: bool = False):
    """Memory3 forward: tokens [B, T] -> logits [B, T, V] (and the context kv, as `Transformer.forward`).

    memories: one entry per chunk (a list of length ceil(T / chunk)), or one entry used for every chunk; an
        entry is None (nothing retrieved), a Memory (R references, the same for every sequence of the batch),
        or a list of B Memory/None (each sequence's own references). Any object with keys, values and counts
        arrays (numpy too) stands for a Memory; slots at or beyond counts are hidden by the prefix mask.
    chunk: tokens per chunk (default cfg.retrieval_interval), counted from the first of `tokens` (the caller
        aligns chunks when continuing from past_kv).
    pos_offset: RoPE position of context index 0 (default cfg.reference_max_tokens: the memories own the
        positions [0, reference_max_tokens), the context follows).
    past_kv: the context kv of earlier tokens (P of them, positions pos_offset .. pos_offset+P-1); `tokens`
        get positions pos_offset+P+index.

    This loop is the definition: chunk c calls `Transformer.forward` on its tokens with the past context kv and
    `memory_prefix` of its memories, so at each memory layer a query of the chunk attends to the <ref> key/value,
    the valid slots of its chunk's memories (no causal mask among them) and the causal context; other layers
    see only the causal context. With nothing retrieved the memory layers still attend to <ref>, so "memory mode
    with no memories" is a well-defined model (the one trained with memory, minus the knowledge).
    """
    chunk, pos_offset, B, T, n_chunks, per_chunk = _chunk_plan(model, tokens, memories, chunk, pos_offset)
    ref = ref_kv(model)
    P = past_kv[0][0].shape[2] if past_kv else 0
    kv, outs = past_kv, []
    for c in range(n_chunks):
        a, b = c * chunk, min(T, (c + 1) * chunk)
        positions = torch.arange(pos_offset + P + a, pos_offset + P + b, device=tokens.device)
        logits, kv = model(tokens[:, a:b], positions=positions, past_kv=kv,
                           prefix_kv=memory_prefix(model, per_chunk[c], B, ref), return_kv=True)
        outs.append(logits)
    logits = torch.cat(outs, dim=1)
    return (logits, kv) if return_kv else logits


def forward_with_memory_parallel(model: Transformer, tokens: torch.Tensor, memories, chunk: int | None = None,
                                 pos_offset: int | None = None, past_kv: list[KV] | None = None,
                                 return_kv: bool = False):
    """`forward_with_memory` in one pass (for training): same arguments, same result up to float rounding.

    The prefix at each memory layer is <ref> followed by every chunk's memory slots; a per-query mask lets the
    tokens of chunk c see <ref> and chunk c's slots only.
    """
    cfg = model.cfg
    chunk, pos_offset, B, T, n_chunks, per_chunk = _chunk_plan(model, tokens, memories, chunk, pos_offset)
    device = tokens.device
    Lm, G = len(cfg.memory_layer_ids), cfg.n_kv_heads
    rk, rv = ref_kv(model)
    ks = [rk[None].expand(B, -1, -1, -1, -1)]
    vs = [rv[None].expand(B, -1, -1, -1, -1)]
    vis = [torch.ones(B, Lm, G, T, 1, dtype=torch.bool, device=device)]
    chunk_of = torch.arange(T, device=device) // chunk  # [T]
    for c in range(n_chunks):
        k, v, m = _chunk_slots(cfg, per_chunk[c], B, device)
        ks.append(k.to(rk.dtype))
        vs.append(v.to(rv.dtype))
        vis.append(m[:, :, :, None, :] & (chunk_of == c)[None, None, None, :, None])
    k, v, vis = torch.cat(ks, dim=3), torch.cat(vs, dim=3), torch.cat(vis, dim=4)
    prefix = {layer: (k[:, li], v[:, li], vis[:, li]) for li, layer in enumerate(cfg.memory_layer_ids)}
    P = past_kv[0][0].shape[2] if past_kv else 0
    positions = torch.arange(pos_offset + P, pos_offset + P + T, device=device)
    return model(tokens, positions=positions, past_kv=past_kv, prefix_kv=prefix, return_kv=return_kv)
