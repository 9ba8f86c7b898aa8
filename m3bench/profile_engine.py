"""Where a prefill's and a decode step's time goes, phase by phase (for the goals `m3lite bench` reports unmet).

    python -m m3bench.profile_engine --preset default [--weights fp32|int8] [--tokens 128] [--repeats 5]
    python -m m3bench.profile_engine --model DIR

Prefill: the engine's own `prefill`, with a timer around each call its block makes (matrix products, RoPE and KV
store, attention, SwiGLU, norms; the rest, embedding lookup included, is "other"). Decode: the one compiled step as a whole, against the
time a numba-free numpy copy of the same weight bytes takes (the step cannot be split without changing it;
decode of these models is weight streaming, so its share of copy bandwidth says how close it is).
Prints one table per part; medians of --repeats. Run it on a quiet machine.
"""
import argparse
import statistics
import time
from collections import defaultdict

import m3lite  # noqa: F401  (sets OPENBLAS_THREAD_TIMEOUT before numpy loads)
import numpy as np

from m3lite import engine as E
from m3bench.bench import _preset_model, copy_bandwidth, weight_bytes_per_token
from m3lite.defaults import cache_dir
from m3lite.model import Model


# the calls of `Engine._prefill_block`, by phase: module functions of m3lite.engine and engine methods
PHASES = {"rmsnorm_rows": "norms", "rope_rows": "rope + kv store", "_store_kv": "rope + kv store",
          "attention_prefill": "attention", "silu_mul": "SwiGLU", "_mm": "matrix products (all 7 per layer, head)"}
METHODS = ("_mm",)


def _timer(fn, phase, t):
    def timed(*a, **k):
        s = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            t[phase] += time.perf_counter() - s
    return timed


def _timed_prefill(eng, ids, t):
    """`Engine.prefill` itself, with a timer (dict t, seconds per phase) around each call of its block; the
    patches are undone afterwards."""
    saved = {name: getattr(E, name) for name in PHASES if hasattr(E, name)}
    try:
        for name, fn in saved.items():
            setattr(E, name, _timer(fn, PHASES[name], t))
        for name in METHODS:
            setattr(eng, name, _timer(getattr(eng, name), PHASES[name], t))
        eng.prefill(ids)
    finally:
        for name, fn in saved.items():
            setattr(E, name, fn)
        for name in METHODS:
            delattr(eng, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--weights", default="fp32", choices=("fp32", "int8"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    path = a.model or _preset_model(a.preset, cache_dir() / "bench" / "models" / a.preset)
    model = Model.load(path, weights=a.weights)
    eng = model.engine()
    ids = np.random.default_rng(0).integers(5, model.config.vocab_size, a.tokens)

    runs = []
    for _ in range(a.repeats + 1):  # the first is a warm-up
        eng.reset()
        t = defaultdict(float)
        s = time.perf_counter()
        _timed_prefill(eng, ids, t)
        t["total"] = time.perf_counter() - s
        runs.append(t)
    runs = runs[1:]
    total = statistics.median(r["total"] for r in runs)
    print(f"prefill, {a.tokens} tokens, {a.weights}: {total * 1e3:.1f} ms ({a.tokens / total:,.0f} tokens/s)")
    print("| phase | ms | share |\n|---|---:|---:|")
    for r in runs:
        r["other"] = r["total"] - sum(v for k, v in r.items() if k != "total")
    for phase in (p for p in runs[0] if p != "total"):
        ms = statistics.median(r[phase] for r in runs) * 1e3
        print(f"| {phase} | {ms:.2f} | {ms / (total * 1e3):.0%} |")

    steps = []
    for _ in range(a.repeats):
        eng.reset()
        eng.prefill(ids[:8])
        s = time.perf_counter()
        for tok in ids[:64]:
            eng.decode(int(tok))
        steps.append((time.perf_counter() - s) / 64)
    step = statistics.median(steps)
    cfg = model.config.to_dict()
    nbytes = weight_bytes_per_token(cfg, a.weights)
    bw = copy_bandwidth()
    print(f"\ndecode step, {a.weights}: {step * 1e6:.0f} us ({1 / step:,.0f} tokens/s); weights read per token "
          f"{nbytes / 1e6:.1f} MB -> {nbytes / step / 1e9:.1f} GB/s; numpy copy bandwidth {bw / 1e9:.1f} GB/s "
          f"(read + write); the step streams its weights at {nbytes / step / bw:.0%} of it")


if __name__ == "__main__":
    main()
