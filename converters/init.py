"""Create a randomly initialised model directory (for tests, benchmarks, and as the start of training).

    python -m converters.init --out models/tiny --preset tiny
    python -m converters.init --out /tmp/m --preset default --n-layers 4 --head-dim 48 --untied --seed 1
    python -m converters.init --out models/small --preset default --dtype float16   # half the disk

Needs numpy, onnx and sentencepiece, not torch: the weights come from numpy's PCG64 generator, in the same
order and with the same values as `converters.model.Transformer(cfg, seed)`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from m3lite.config import PRESETS, ModelConfig
from m3lite.errors import M3Error
from m3lite.modelfile import FLOAT_DTYPES, tensor_shapes

from .random_init import fill_random


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Stacked float32 runtime tensors of a freshly initialised model, filled in place (no extra copies)."""
    tensors = {name: (np.ones(shape, np.float32) if name.endswith("norm") else np.empty(shape, np.float32))
               for name, shape in tensor_shapes(cfg).items()}
    for _ in fill_random(cfg, seed, lambda kind, layer: tensors[kind] if layer is None else tensors[kind][layer]):
        pass
    return tensors


def init_model_dir(out_dir: str | os.PathLike, cfg: ModelConfig, seed: int = 0,
                   tokenizer: str | os.PathLike | None = None, dtype: str = "float32") -> str:
    """Write a random model directory with weights stored as `dtype` ("float32" or "float16"); the tokenizer
    defaults to one trained on the text at hand (cached). Returns the fingerprint."""
    from .export_onnx import export_stacked
    from .tokenizer import cached_tokenizer

    tok = Path(tokenizer) if tokenizer is not None else cached_tokenizer(cfg.vocab_size)
    tensors = random_weights(cfg, seed)
    return export_stacked(cfg, tensors, tok, out_dir, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converters.init",
        description="Create a randomly initialised m3lite model directory (ONNX graph, weights, tokenizer). "
                    "The tokenizer is trained on the text at hand for the requested vocabulary size and cached.",
        epilog="presets:\n" + "\n".join(
            f"  {name:<11} " + " ".join(f"{k}={v}" for k, v in shape.items()) for name, shape in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="model directory to write (created; an existing model there is "
                                                 "replaced)")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="starting shape; the options below "
                                                                           "override it (default: tiny)")
    p.add_argument("--dim", type=int, help="hidden size")
    p.add_argument("--n-layers", type=int, help="number of transformer blocks")
    p.add_argument("--n-heads", type=int, help="query heads")
    p.add_argument("--n-kv-heads", type=int, help="key/value heads (GQA); must divide --n-heads")
    p.add_argument("--ffn-dim", type=int, help="SwiGLU hidden size")
    p.add_argument("--vocab-size", type=int, help="tokenizer and embedding size (>= 277)")
    p.add_argument("--head-dim", type=int, help="per-head size (default dim / n_heads)")
    p.add_argument("--max-seq-len", type=int, help="longest context the model is meant for")
    p.add_argument("--untied", action="store_true", help="separate output projection (default: tied to the "
                                                         "token embedding)")
    p.add_argument("--tokenizer", help="use this sentencepiece model instead of training one (its size must "
                                       "equal the vocabulary size)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    p.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES,
                   help="how the weights are stored: float16 halves the files; the math stays float32 "
                        "(default: float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = ModelConfig.preset(
            args.preset, dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
            ffn_dim=args.ffn_dim, vocab_size=args.vocab_size, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
            tie_embeddings=False if args.untied else None)
        fp = init_model_dir(args.out, cfg, seed=args.seed, tokenizer=args.tokenizer, dtype=args.dtype)
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {cfg.name} model, {cfg.n_params():,} parameters ({args.dtype}), fingerprint {fp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
