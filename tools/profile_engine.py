"""Where a prefill's and a decode step's time goes, phase by phase (for the goals `m3lite bench` reports unmet).

    python tools/profile_engine.py --preset default [--weights fp32|int8] [--tokens 128] [--repeats 5]
    python tools/profile_engine.py --model DIR

Prefill: the engine's own `_prefill_block`, re-run here with a timer around each call (projections, RoPE and
KV store, attention, output projection + MLP, norms). Decode: the one compiled step as a whole, against the
time a numba-free numpy copy of the same weight bytes takes (the step cannot be split without changing it;
decode of these models is weight streaming, so its share of copy bandwidth says how close it is).
Prints one table per part; medians of --repeats. Run it on a quiet machine.
"""
import argparse
import statistics
import time
from collections import defaultdict

import m3lite  # noqa: F401  (sets OPENBLAS_THREAD_TIMEOUT before numpy loads)
import numba
import numpy as np

from m3lite import engine as E
from m3lite.bench import _preset_model, copy_bandwidth, weight_bytes_per_token
from m3lite.defaults import cache_dir
from m3lite.model import Model


def _timed_prefill(eng, ids, t):
    """`Engine._prefill_block` with a timer (dict t, seconds per phase) around each step."""
    def run(phase, fn, *a):
        s = time.perf_counter()
        fn(*a)
        t[phase] += time.perf_counter() - s

    m = ids.shape[0]
    pos0, slot0, hd = eng.pos_offset + eng._n_past, eng.prefix_capacity + eng._n_past, eng.cfg.hd
    x, xb = eng.px[:m], eng.pxb[:m]
    q, k, v, ao = eng.pq[:m], eng.pk[:m], eng.pv[:m], eng.pao[:m]
    h1, h3 = eng.ph1[:m], eng.ph3[:m]
    run("embedding", np.take, eng.tok_embeddings, ids, 0, x)
    for l in range(eng.cfg.n_layers):
        run("norms", E.rmsnorm_rows, x, eng.attention_norm[l], eng.eps, xb)
        for name, out in (("wq", q), ("wk", k), ("wv", v)):
            run("q k v projections", eng._mm, xb, name, l, out)
        run("rope + kv store", E.rope_rows, q, hd, eng.cos, eng.sin, pos0)
        run("rope + kv store", E._store_kv, k, v, eng.k_cache[l], eng.v_cache[l], slot0, hd, eng.cos, eng.sin, pos0)
        run("attention", E.attention_prefill, q, eng.k_cache[l], eng.v_cache[l], eng.attn_start[l], slot0,
            eng.n_rep, eng.scale, eng.pscores, ao)
        run("output projection + norm + MLP", eng._out_and_mlp_rows, l, ao, x, xb, h1, h3)
    run("norms", E.rmsnorm_rows, x, eng.norm, eng.eps, xb)
    eng._n_past += m
    last = np.empty((1, eng.cfg.vocab_size), np.float32)
    run("head (last token)", eng._mm, xb[m - 1:m], "output", 0, last)


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
        numba.set_num_threads(1)  # as Engine.prefill: BLAS owns the cores
        s = time.perf_counter()
        _timed_prefill(eng, ids, t)
        t["total"] = time.perf_counter() - s
        runs.append(t)
    runs = runs[1:]
    total = statistics.median(r["total"] for r in runs)
    print(f"prefill, {a.tokens} tokens, {a.weights}: {total * 1e3:.1f} ms ({a.tokens / total:,.0f} tokens/s)")
    print("| phase | ms | share |\n|---|---:|---:|")
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
