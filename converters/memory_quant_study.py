"""What storing memories with fewer bits costs in answers (issue 14's "where pq loses" tables in the README).

    python -m converters.memory_quant_study --bank BANK --qa QA [--model M] [--limit N] [--refs 1] SCHEME...

BANK must hold float32 memories (`m3lite bank build NOTES --quant f32 --encode all`), so that every scheme starts
from the same exact memories: each SCHEME (KEYS:VALUES, e.g. int8:int8, int4:pq, chan2:pq) is applied to the
memories as the bank returns them, and the questions of QA (`python -m converters.facts`) are answered in memory
mode, greedy, first line, as `m3lite eval --qa` does. One JSON line per scheme: bytes per token slot (keys, values
and the 2-byte position) and that over int8's, `contains`, and the questions right only with the first
scheme / only with this one (the same questions for every scheme, so these say how much of a difference is
noise).

A side (keys or values) is one of:
    f32, f16, int8, int4   as the bank stores them (m3lite.memory_quant: one float16 scale per vector)
    pq                     m3lite.pq, codebooks trained on the bank's first references as a pq bank would
    chanN                  N bits per value, min/max per channel over a reference's tokens of one head (KIVI's
                           keys), a float16 scale and zero per channel
    tokN                   N bits per value, min/max per vector, a float16 scale and zero per vector
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Callable

import numpy as np

from m3lite import memory_quant as Q
from m3lite import pq as PQ
from m3lite.bank import Bank
from m3lite.errors import BadArgument, M3Error

POSITION_BYTES = 2


def min_max(x: np.ndarray, bits: int, axis: int, valid: np.ndarray) -> np.ndarray:
    """x quantized to 2**bits levels between its minimum and maximum over `axis` (among `valid` entries, a mask
    broadcastable to x) and decoded; scale and zero rounded to float16 as they would be stored; invalid entries
    come back as 0. Error per value <= scale / 2 (+ float16 rounding of the zero)."""
    if not 1 <= bits <= 8:
        raise BadArgument(f"bits must be 1..8, got {bits}")
    levels = (1 << bits) - 1
    x = np.asarray(x, np.float32)
    valid = np.broadcast_to(valid, x.shape)
    lo = np.where(valid, x, np.inf).min(axis=axis, keepdims=True)
    hi = np.where(valid, x, -np.inf).max(axis=axis, keepdims=True)
    empty = ~np.isfinite(lo)
    lo, hi = np.where(empty, 0, lo), np.where(empty, 0, hi)
    lo = lo.astype(np.float16).astype(np.float32)
    scale = np.maximum(hi - lo, 0) / levels
    scale = scale.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((x - lo) / np.where(scale > 0, scale, 1)), 0, levels)
    return np.where(valid, q * scale + lo, 0).astype(np.float32)


class Side:
    """One side's scheme: apply(x [n, Lm, H, T, hd], valid [n, Lm, H, T, 1], kv) -> decoded x; bytes per slot."""

    def __init__(self, name: str, tokens_per_head: int, head_dim: int):
        self.name = name
        self.codebooks: np.ndarray | None = None
        if name in Q.MODES:
            self.bytes = Q.bytes_per_vector(head_dim, name)
        elif re.fullmatch(r"(chan|tok)[1-8]", name):
            self.bits = int(name[-1])
            scale_zero = 4 * head_dim / tokens_per_head if name.startswith("chan") else 4
            self.bytes = self.bits * head_dim / 8 + scale_zero
        else:
            raise BadArgument(f"unknown scheme side {name!r}: use f32, f16, int8, int4, pq, chanN or tokN (N 1-8)")

    def apply(self, x: np.ndarray, valid: np.ndarray, kv: int) -> np.ndarray:
        n = self.name
        if n in ("f32", "f16", "int8", "int4"):
            return Q.dequantize(Q.quantize(x, n), n) * valid
        if n == "pq":
            return PQ.decode(PQ.encode(x, self.codebooks, kv), self.codebooks, kv) * valid
        return min_max(x, self.bits, 3 if n.startswith("chan") else 4, valid)


class Scheme:
    def __init__(self, text: str, tokens_per_head: int, head_dim: int):
        parts = text.split(":")
        if len(parts) != 2:
            raise BadArgument(f"a scheme is KEYS:VALUES (e.g. int4:pq), got {text!r}")
        self.text = text
        self.keys, self.values = (Side(p, tokens_per_head, head_dim) for p in parts)

    @property
    def bytes_per_slot(self) -> float:
        return self.keys.bytes + self.values.bytes + POSITION_BYTES

    def apply(self, k: np.ndarray, v: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = (np.arange(k.shape[3]) < counts[..., None])[..., None]
        return self.keys.apply(k, valid, 0), self.values.apply(v, valid, 1)


class StudyBank(Bank):
    """A Bank whose memories come back through a scheme (set `scheme`); everything else is the bank's."""
    scheme: Scheme | None = None

    def memories(self, ids, encode_fn: Callable | None = None):
        k, v, pos, cnt = super().memories(ids, encode_fn)
        if self.scheme is not None:
            k, v = self.scheme.apply(k, v, cnt)
        return k, v, pos, cnt


def answers_right(model, bank, items, refs: int | None) -> list[bool]:
    """Whether each question's memory-mode answer (greedy, first line, as `m3lite eval`) contains its answer."""
    from m3lite.evaluate import EVAL_MAX_TOKENS, STOP, contains
    from m3lite.memory import MemorySession

    search = MemorySession(model, bank, mode="rag", retriever="hybrid").search
    return [bool(contains(model.ask(it.question, max_new_tokens=EVAL_MAX_TOKENS, bank=bank, mode="memory",
                                    stop=[STOP], retriever=search, refs=refs), it.answer)) for it in items]


def study(model, bank: StudyBank, qa: str, schemes: list[Scheme], limit: int | None, refs: int | None,
          say: Callable[[dict], None]) -> list[dict]:
    from m3lite.evaluate import read_qa

    if bank.quant != "f32":
        raise BadArgument(f"the study needs a bank of float32 memories (bank build --quant f32), this one is "
                          f"{bank.quant}")
    items = read_qa(qa, bank)[:limit]
    if any(s.name == "pq" for sc in schemes for s in (sc.keys, sc.values)):
        bank.scheme = None
        k, v, _, cnt = bank.memories(np.arange(min(PQ.TRAIN_REFS, bank.count)))
        cb = PQ.train(k, v, cnt)
        for sc in schemes:
            sc.keys.codebooks = sc.values.codebooks = cb
    int8 = Q.bytes_per_vector(bank.shape.head_dim, "int8") * 2 + POSITION_BYTES
    out, first = [], None
    for sc in schemes:
        bank.scheme = sc
        right = answers_right(model, bank, items, refs)
        first = first or right
        row = {"scheme": sc.text, "bytes_per_slot": round(sc.bytes_per_slot, 2),
               "vs_int8": round(sc.bytes_per_slot / int8, 3), "questions": len(right),
               "contains": round(float(np.mean(right)), 4) if right else None,
               "right_only_first": sum(a and not b for a, b in zip(first, right)),
               "right_only_this": sum(b and not a for a, b in zip(first, right))}
        say(row)
        out.append(row)
    bank.scheme = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.memory_quant_study",
                                description="What memory quantization schemes cost in memory-mode answers.")
    p.add_argument("--bank", required=True, help="a bank of float32 memories (bank build --quant f32)")
    p.add_argument("--qa", required=True, help="questions (qa.jsonl of python -m converters.facts)")
    p.add_argument("--model", default=None, help="model directory (default: the default model)")
    p.add_argument("--limit", type=int, default=None, help="first N questions only")
    p.add_argument("--refs", type=int, default=None, help="references per question (default the model's)")
    p.add_argument("schemes", nargs="+", metavar="SCHEME", help="KEYS:VALUES, e.g. int8:int8 int4:pq chan2:pq")
    args = p.parse_args(argv)
    try:
        from m3lite.defaults import default_model_dir
        from m3lite.memory import open_bank
        from m3lite.model import Model

        model = Model.load(args.model or default_model_dir())
        bank = open_bank(args.bank, model)
        bank.__class__ = StudyBank
        schemes = [Scheme(s, bank.shape.tokens_per_head, bank.shape.head_dim) for s in args.schemes]
        model.check_refs(args.refs)
        study(model, bank, args.qa, schemes, args.limit, args.refs, lambda row: print(json.dumps(row), flush=True))
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
