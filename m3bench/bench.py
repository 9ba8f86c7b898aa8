"""`m3lite bench`: m3lite side by side with llama.cpp, onnxruntime and PyTorch on the same machine and weights.

One run measures, for each runtime and the same 128-token prompt (token ids, so tokenization plays no part) and
128 greedy tokens at batch 1: prefill tokens/s, decode tokens/s, time to first token and peak RSS; the median of
`repeats` runs after a short warm-up. Rows:

- m3lite fp32 and int8 (int8 when this m3lite can load int8 weights), each in the modes none, memory (5 explicit
  memories per 64-token chunk, from a small bank of Wikipedia references) and rag (the same 5 references, ~128
  tokens each, as text before the prompt);
- onnxruntime over the model's own model.onnx; PyTorch eager (converters.model, when torch is installed);
- llama.cpp (llama-cpp-python, when installed) over GGUF exports of the same weights, F32 and Q8_0.

Every row runs in its own Python process (`python -m m3bench.bench --worker SPEC`; the PyTorch row
`python -m m3bench.torch_row --worker SPEC`, since m3lite itself never imports torch), so its peak RSS is its
own and no runtime's imports or threads touch another's. Each row is also given as a
ratio to llama.cpp at the same precision (F32 for fp32 rows, Q8_0 for int8 rows) or, without llama.cpp, to m3lite
fp32 (`ratio_to` says which). The roofline: the machine's copy bandwidth (numpy, bytes read + written per second)
and the share of it each decode reaches, counting the weight bytes read per token.

Missing peers are reported as skipped, with the reason; speeds are reported, never asserted.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from m3lite.errors import BadArgument, M3Error

PROMPT_TOKENS = 128
NEW_TOKENS = 128
WARMUP_TOKENS = 4
BANK_DOCUMENTS = 12  # enough references for 5 retrieved per chunk, few enough to encode fast on a 1B model
WORKER_TIMEOUT_S = 3600
Q8_BYTES_PER_WEIGHT = 34 / 32  # one float16 scale per block of 32 int8 values (llama.cpp's Q8_0)
MODES = ("none", "memory", "rag")

# (runtime, precision, mode) in the order they run; llama.cpp reads GGUF F32 (fp32) and Q8_0 (int8)
ROWS: list[tuple[str, str, str]] = [
    ("m3lite", "fp32", "none"), ("m3lite", "int8", "none"), ("onnxruntime", "fp32", "none"),
    ("pytorch", "fp32", "none"), ("llama.cpp", "fp32", "none"), ("llama.cpp", "int8", "none"),
    ("m3lite", "fp32", "memory"), ("m3lite", "fp32", "rag"), ("m3lite", "int8", "memory"), ("m3lite", "int8", "rag"),
]
# --under-load: these rows run again while a busy process (one Python loop, not pinned) holds a core
LOAD_ROWS = [row for row in ROWS if row[2] == "none"]
LOAD = "1 busy process"
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0"}
FORMAT = {("llama.cpp", "fp32"): "GGUF F32", ("llama.cpp", "int8"): "GGUF Q8_0", ("pytorch", "fp32"): "torch fp32",
          ("onnxruntime", "fp32"): "ONNX fp32"}


PULLED_PRESET = "smollm2"  # --preset smollm2: the default model as `m3lite pull` makes it


class Unavailable(Exception):
    """A peer that cannot run here (not installed, or not supported by this m3lite): the row is skipped."""


# ------------------------------------------------------------------------------------------------ the run

def run_bench(model: str | os.PathLike | None = None, preset: str | None = None, repeats: int = 3,
              progress: Callable[[int, int, str], None] | None = None, under_load: bool = False,
              rounds: int = 1) -> dict[str, Any]:
    """Run every row and return the results (see the module docstring). `model` is a model directory; `preset`
    makes (once, in the cache) a random model of that preset instead. `under_load`: the mode-none rows run
    again while a busy process started by the bench holds one core (`under_load` in the result compares).
    `rounds`: every row runs that many times in turn, and each figure and ratio is the median over the rounds
    (`_merge_rounds`), so that a machine whose speed drifts over minutes moves a row and its reference alike."""
    if (model is None) == (preset is None):
        raise BadArgument("give either a model directory (--model) or a preset (--preset)")
    if repeats < 1:
        raise BadArgument(f"repeats must be >= 1, got {repeats}")
    if rounds < 1:
        raise BadArgument(f"rounds must be >= 1, got {rounds}")
    from m3lite.config import PRESETS
    from m3lite.modelfile import ModelFiles, cache_dir

    if preset == PULLED_PRESET:  # the real default model, pulled once
        from m3lite.pull import pull

        model, preset = pull()["model"], None
    if preset is not None and preset not in PRESETS:
        raise BadArgument(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}, {PULLED_PRESET}")
    if model is not None:
        ModelFiles.open(model, verify=False)  # a missing or broken model fails now, not in a worker

    root = cache_dir() / "bench"
    load_before = _loadavg()
    plan = [(row, None) for row in ROWS] + ([(row, LOAD) for row in LOAD_ROWS] if under_load else [])
    total = len(plan) * rounds + 2
    step = _Steps(progress, total)
    with tempfile.TemporaryDirectory(prefix="m3lite-bench-") as tmp:
        step("preparing the model, bank and GGUF files")
        setup = _worker({"task": "setup", "model": str(model) if model is not None else None, "preset": preset,
                         "root": str(root), "gguf": _has("llama_cpp")}, Path(tmp))
        if setup["status"] != "ok":
            raise M3Error(f"bench setup failed: {setup['reason']}")
        step("measuring the copy bandwidth")
        bandwidth = copy_bandwidth()
        common = {"model": setup["model"], "prompt": setup["prompt"], "new_tokens": NEW_TOKENS, "repeats": repeats,
                  "bank": setup["bank"]}
        per_round = []
        for rnd in range(rounds):
            rows = []
            for (runtime, precision, mode), load in plan:
                step(f"{runtime} {precision} {mode}" + (f" under load ({load})" if load else "")
                     + (f", round {rnd + 1} of {rounds}" if rounds > 1 else ""))
                spec = dict(common, task="row", runtime=runtime, precision=precision, mode=mode,
                            gguf=setup["gguf"].get(precision))
                row = {"runtime": runtime, "precision": precision, "mode": mode, "load": load or "quiet",
                       "format": FORMAT.get((runtime, precision), f"m3lite {precision}")}
                skip = _skip_reason(runtime, precision, setup)
                if skip is None and load:
                    with BusyCore():
                        skip = _worker(spec, Path(tmp))
                row.update(skip or _worker(spec, Path(tmp)))
                rows.append(row)
            per_round.append(rows)
        step(None)
    cfg = setup["config"]
    for rows in per_round:
        for row in rows:
            _add_roofline(row, cfg, bandwidth)
        baseline = _add_ratios([r for r in rows if r["load"] == "quiet"])
        if under_load:
            _add_ratios([r for r in rows if r["load"] != "quiet"])
    rows = _merge_rounds(per_round)
    return {
        "model": {k: setup[k] for k in ("model", "name", "params", "fingerprint", "disk_bytes")} | {"preset": preset},
        "machine": machine_info() | {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                                     "load_average_before": load_before, "load_average_after": _loadavg()},
        "settings": {"prompt_tokens": len(setup["prompt"]), "new_tokens": NEW_TOKENS, "batch": 1,
                     "repeats": repeats, "rounds": rounds, "statistic": "median", "sampling": "greedy",
                     "bank_references": setup["bank_references"]},
        "baseline": baseline,
        "rows": rows,
        "memory": _memory_summary([r for r in rows if r["load"] == "quiet"]),
    } | ({"under_load": _load_summary(rows)} if under_load else {})


class BusyCore:
    """A busy process for the length of a `with` block: one Python loop that never sleeps (not pinned; the
    scheduler places it), as another program holding a core of a laptop does."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let it take its core
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def _load_summary(rows: list[dict]) -> dict[str, Any]:
    """Per runtime and precision (mode none): decode speed under load over quiet, TTFT quiet over under load
    (both: the share of its quiet speed a runtime keeps; the goal is >= 0.5 for m3lite), and m3lite's decode
    and TTFT under load against llama.cpp's under the same load at the same precision."""
    ok = {(r["runtime"], r["precision"], r["load"]): r for r in rows if r["mode"] == "none" and r.get("status") == "ok"}
    out: dict[str, Any] = {"load": LOAD, "kept": {}}
    for (runtime, precision, load), r in ok.items():
        quiet = ok.get((runtime, precision, "quiet"))
        if load == "quiet" or quiet is None:
            continue
        out["kept"][f"{runtime} {precision}"] = {
            "decode": round(r["decode_tokens_per_s"] / quiet["decode_tokens_per_s"], 3),
            "ttft": round(quiet["ttft_ms"] / r["ttft_ms"], 3)}
        peer = ok.get(("llama.cpp", precision, load))
        if runtime == "m3lite" and peer is not None:
            out[f"m3lite_{precision}_over_llama_cpp_under_load"] = {
                "decode": round(r["decode_tokens_per_s"] / peer["decode_tokens_per_s"], 3),
                "ttft": round(peer["ttft_ms"] / r["ttft_ms"], 3)}
    return out


class _Steps:
    def __init__(self, progress, total: int):
        self.progress, self.total, self.done = progress, total, -1

    def __call__(self, what: str | None) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, what or "done")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _skip_reason(runtime: str, precision: str, setup: dict) -> dict | None:
    """A skipped row's status, decided without starting a process (peers that are not installed)."""
    if runtime == "pytorch" and not _has("torch"):
        return {"status": "skipped", "reason": "torch is not installed (pip install torch==2.13.0, the CPU build)"}
    if runtime == "llama.cpp":
        if not _has("llama_cpp"):
            return {"status": "skipped", "reason": "llama-cpp-python is not installed (pip install 'm3lite[bench]')"}
        if not setup["gguf"].get(precision):
            return {"status": "skipped", "reason": setup.get("gguf_error") or "no GGUF export"}
    return None


def _worker(spec: dict, tmp: Path) -> dict:
    """Run one task in a fresh Python process; its last stdout line is the JSON result."""
    path = tmp / f"spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if spec.get("runtime") != "m3lite":  # peers run with the user's environment, not m3lite's thread settings
        from m3lite import ENV_SET
        for k in ENV_SET:
            env.pop(k, None)
        env["M3LITE_KEEP_ENV"] = "1"
    root = str(Path(__file__).resolve().parent.parent)  # m3lite, m3bench and converters importable from the child
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        module = "m3bench.torch_row" if spec.get("runtime") == "pytorch" else "m3bench.bench"
        p = subprocess.run([sys.executable, "-m", module, "--worker", str(path)], capture_output=True,
                           text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"did not finish in {WORKER_TIMEOUT_S} s"}
    lines = [s for s in p.stdout.splitlines() if s.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [s for s in p.stderr.strip().splitlines() if s.strip()]
    return {"status": "failed", "reason": (err[-1] if err else f"exit status {p.returncode}")[:300]}


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """The machine's memory copy bandwidth in bytes/s (bytes read + bytes written), the median of `repeats`
    copies of an `nbytes` array (large enough to leave every cache)."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times)


def machine_info() -> dict[str, Any]:
    from m3lite.threads import default_threads, physical_cores

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(),
            "threads": default_threads(), "python": platform.python_version(),
            "platform": platform.platform()}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def weight_bytes_per_token(cfg: dict, precision: str) -> int:
    """Bytes of weights one decode step reads: every layer matrix and norm, the final norm and the output head
    (one row of the token embedding is negligible). int8: Q8_0 matrices (34 bytes per 32 weights), fp32 norms."""
    d, L, f, v = cfg["dim"], cfg["n_layers"], cfg["ffn_dim"], cfg["vocab_size"]
    hd = cfg["head_dim"] or d // cfg["n_heads"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    matrices = L * (2 * d * q + 2 * d * kv + 3 * d * f) + v * d
    norms = (2 * L + 1) * d
    per_weight = 4 if precision == "fp32" else Q8_BYTES_PER_WEIGHT
    return int(matrices * per_weight + 4 * norms)


def _add_roofline(row: dict, cfg: dict, bandwidth: float) -> None:
    if row.get("status") != "ok":
        return
    b = weight_bytes_per_token(cfg, row["precision"])
    row["weight_bytes_per_token"] = b
    row["bandwidth_fraction"] = round(b * row["decode_tokens_per_s"] / bandwidth, 4)


RATIO_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_rss_mb")


def _add_ratios(rows: list[dict]) -> str:
    """Each row's figures divided by the reference's: llama.cpp at the row's precision (mode none), else m3lite
    fp32 (mode none). Returns which reference was used ("llama.cpp" or "m3lite fp32")."""
    def find(runtime, precision):
        return next((r for r in rows if (r["runtime"], r["precision"], r["mode"]) == (runtime, precision, "none")
                     and r.get("status") == "ok"), None)

    m3 = find("m3lite", "fp32")
    used = set()
    for row in rows:
        if row.get("status") != "ok":
            continue
        ref = find("llama.cpp", row["precision"])
        name = f"llama.cpp {'F32' if row['precision'] == 'fp32' else 'Q8_0'}"
        if ref is None:
            ref, name = m3, "m3lite fp32"
        if ref is None:
            continue
        used.add(name.split(" ")[0] if name.startswith("llama.cpp") else name)
        row["ratio_to"] = name
        row["ratio"] = {k: round(row[k] / ref[k], 3) for k in RATIO_KEYS if ref.get(k)}
    return " and ".join(sorted(used)) if used else "none"


ROUND_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "bandwidth_fraction")


def _merge_rounds(per_round: list[list[dict]]) -> list[dict]:
    """One row per plan entry from the rounds' rows (each round runs the same plan, ratios already added per
    round): speeds, TTFT and bandwidth share the median over the rounds that ran, peak RSS the largest, each
    ratio the median of the rounds' ratios (a row against its reference of the same round); `rounds` lists
    the per-round figures. A row that no round ran is the first round's (skipped or failed)."""
    if len(per_round) == 1:
        return per_round[0]
    out = []
    for rs in zip(*per_round):
        ok = [r for r in rs if r.get("status") == "ok"]
        if not ok:
            out.append(rs[0])
            continue
        row = dict(ok[0])
        for k in ROUND_KEYS:
            if all(k in r for r in ok):
                row[k] = round(statistics.median(r[k] for r in ok), 4 if k == "bandwidth_fraction" else 3)
        if all("peak_rss_mb" in r for r in ok):
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
        ratios = [r["ratio"] for r in ok if "ratio" in r]
        if ratios:
            row["ratio"] = {k: round(statistics.median(x[k] for x in ratios), 3)
                            for k in ratios[0] if all(k in x for x in ratios)}
        row["rounds"] = {k: [r.get(k) for r in ok] for k in ROUND_KEYS + ("peak_rss_mb",)} | {
            "ratio": ratios, "failed": len(rs) - len(ok)}
        out.append(row)
    return out


def _memory_summary(rows: list[dict]) -> dict[str, Any]:
    """Per m3lite precision: memory-mode decode speed over none's, memory-mode TTFT over rag's."""
    out: dict[str, Any] = {}
    for precision in ("fp32", "int8"):
        got = {r["mode"]: r for r in rows if r["runtime"] == "m3lite" and r["precision"] == precision
               and r.get("status") == "ok"}
        if "none" in got and "memory" in got:
            out[f"{precision}_decode_memory_over_none"] = round(
                got["memory"]["decode_tokens_per_s"] / got["none"]["decode_tokens_per_s"], 3)
        if "memory" in got and "rag" in got:
            out[f"{precision}_ttft_memory_over_rag"] = round(got["memory"]["ttft_ms"] / got["rag"]["ttft_ms"], 3)
    return out


# ------------------------------------------------------------------------------------------------ reports

def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def markdown_table(res: dict) -> str:
    m, mc, s = res["model"], res["machine"], res["settings"]
    lines = [
        f"Model: {m['name']} ({m['params'] / 1e6:.1f} M parameters, {m['disk_bytes'] / 2**20:.1f} MiB on disk), "
        f"`{m['model']}`.",
        f"Machine: {mc['cpu']}, {mc['physical_cores']} physical cores ({mc['logical_cpus']} logical), "
        f"{mc['threads']} threads; copy bandwidth {mc['copy_bandwidth_gb_s']} GB/s (read + write, numpy); "
        f"load average before {mc['load_average_before']}.",
        f"Prompt {s['prompt_tokens']} tokens, {s['new_tokens']} greedy tokens, batch 1, median of {s['repeats']}"
        + (f", then of {s['rounds']} rounds (each row run {s['rounds']} times in turn)" if s.get("rounds", 1) > 1
           else "") + ". "
        f"Ratios are to {res['baseline']} (`x ref`: decode and prefill speed over the reference's).",
        "",
        "| runtime | weights | mode | load | prompt tokens | prefill tok/s | decode tok/s | TTFT ms | peak RSS MB "
        "| decode x ref | prefill x ref | bandwidth used | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        load = r.get("load", "quiet")
        if r.get("status") != "ok":
            lines.append(f"| {r['runtime']} | {r['format']} | {r['mode']} | {load} | | | | | | | | | "
                         f"{r['status']}: {r.get('reason', '')} |")
            continue
        ratio = r.get("ratio", {})
        note = f"x {r['ratio_to']}" if "ratio_to" in r else ""
        if r.get("references"):
            note += f"; {r['references']} references"
        lines.append(
            f"| {r['runtime']} | {r['format']} | {r['mode']} | {load} | {r['prompt_tokens']} | "
            f"{_fmt(r['prefill_tokens_per_s'])} | {_fmt(r['decode_tokens_per_s'])} | {_fmt(r['ttft_ms'], 1)} | "
            f"{_fmt(r['peak_rss_mb'])} | {_fmt(ratio.get('decode_tokens_per_s'), 2)} | "
            f"{_fmt(ratio.get('prefill_tokens_per_s'), 2)} | {100 * r['bandwidth_fraction']:.0f}% | {note} |")
    mem = res.get("memory") or {}
    if mem:
        lines += ["", "Explicit memory: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in mem.items()) + "."]
    ul = res.get("under_load")
    if ul:
        kept = "; ".join(f"{k} decode {v['decode']}x, TTFT {v['ttft']}x" for k, v in ul["kept"].items())
        peers = "; ".join(f"{k.replace('_', ' ')}: decode {v['decode']}x, TTFT {v['ttft']}x"
                          for k, v in ul.items() if k.endswith("under_load"))
        lines += ["", f"Under load ({ul['load']}), the share of the quiet speed kept (TTFT: quiet over loaded): "
                  f"{kept or '-'}." + (f" Against llama.cpp under the same load: {peers}." if peers else "")]
    return "\n".join(lines) + "\n"


def check_report_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".md":
        raise BadArgument(f"--report takes a .md file, got {p}")
    if not p.parent.is_dir():
        raise BadArgument(f"cannot write {p}: folder {p.parent} does not exist")
    return p


def write_report(res: dict, path: str | os.PathLike) -> Path:
    p = check_report_path(path)
    p.write_text("# m3lite bench\n\n" + markdown_table(res), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ workers

def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: that one survives fork and exec, so a worker
    would report the bench parent's peak when it is the larger."""
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def load_m3lite(model_dir: str, precision: str):
    """The m3lite Model with `precision` weights ("fp32" or "int8"); Unavailable when this m3lite has no int8."""
    from m3lite.model import Model

    if "weights" not in inspect.signature(Model.load).parameters:
        if precision != "fp32":
            raise Unavailable("this m3lite has no int8 weights yet")
        return Model.load(model_dir)
    return Model.load(model_dir, weights=precision)


def _bench_texts(tokenizer) -> list:
    """The documents of the bench's bank and prompt: the first Wikipedia summaries, else random text."""
    from m3lite.sources import Document, SourceError, wiki_documents

    try:
        docs = list(wiki_documents("en", "wiki:en", warn=lambda s: None, limit=BANK_DOCUMENTS))
    except SourceError:
        docs = []
    if len(docs) < BANK_DOCUMENTS:
        rng = np.random.default_rng(0)
        first = 5 + 256  # after the special and byte pieces
        docs = [Document(id=f"random/{i}", title=f"random {i}", source="random",
                         text=tokenizer.decode(rng.integers(first, tokenizer.vocab_size, 300)))
                for i in range(BANK_DOCUMENTS)]
    return docs


def _setup(spec: dict) -> dict:
    """Make the model (preset), the prompt, the bank and the GGUF exports; cached under spec["root"]."""
    from m3lite.modelfile import ModelFiles

    root = Path(spec["root"])
    model_dir = spec["model"]
    if spec["preset"] is not None:
        model_dir = str(_preset_model(spec["preset"], root / "models" / spec["preset"]))
    files = ModelFiles.open(model_dir)
    cfg = files.config
    if cfg.max_seq_len < PROMPT_TOKENS + NEW_TOKENS:
        raise BadArgument(f"the model's context ({cfg.max_seq_len}) is shorter than the bench's {PROMPT_TOKENS} + "
                          f"{NEW_TOKENS} tokens")
    m = load_m3lite(model_dir, "fp32")
    docs = _bench_texts(m.tokenizer)
    ids = [t for d in docs for t in m.tokenizer.encode(d.text)][:PROMPT_TOKENS - 1]
    prompt = [m.tokenizer.bos_id] + ids
    if len(prompt) < PROMPT_TOKENS:
        raise BadArgument("not enough text for a 128-token prompt")

    from m3lite.memory import build_or_add

    bank = root / "banks" / files.fingerprint
    stats = build_or_add(m, bank, docs, warn=lambda s: None)
    del m  # its weights' mapping: the steps below map them again
    try:
        load_m3lite(model_dir, "int8")  # int8 weights quantized (and cached) now, not inside a measured row
    except (Unavailable, M3Error):
        pass  # the int8 rows report it
    out = {"status": "ok", "model": str(Path(model_dir).resolve()), "name": cfg.name, "params": cfg.n_params(),
           "fingerprint": files.fingerprint, "disk_bytes": files.disk_bytes(), "config": cfg.to_dict(),
           "prompt": prompt, "bank": str(bank), "bank_references": stats["count"], "gguf": {}}
    if spec["gguf"]:
        try:
            version = _tool_version("export_gguf")
            for precision, type in GGUF_TYPE.items():
                path = root / "gguf" / f"{files.fingerprint}.{type}.{version}.gguf"
                if not path.is_file():
                    _run_tool("converters.export_gguf", model_dir, "--out", path, "--type", type)
                out["gguf"][precision] = str(path)
        except (M3Error, OSError) as e:
            out["gguf_error"] = f"GGUF export failed: {str(e).splitlines()[0]}"
    return out


# The bench makes its inputs with the converters' command-line tools (random preset models, GGUF exports), run
# as programs like the peers it measures, so the parent process loads neither onnx nor gguf.

def _tool_version(name: str) -> str:
    """A short hash of converters/NAME.py: cached outputs of a tool are remade when the tool changes."""
    spec = importlib.util.find_spec("converters")  # a top-level name: found without running it
    if spec is None or not spec.submodule_search_locations:
        raise BadArgument("the bench needs the converters package (installed with m3lite from its source tree)")
    source = Path(list(spec.submodule_search_locations)[0]) / f"{name}.py"
    return hashlib.sha256(source.read_bytes()).hexdigest()[:12]


def _run_tool(module: str, *args) -> None:
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        raise M3Error(f"{module} failed: {lines[-1] if lines else f'exit status {p.returncode}'}")


def _preset_model(preset: str, path: Path) -> Path:
    """A random model of `preset` (seed 0) at `path`, made once (`python -m converters.init`: numpy and onnx)."""
    from m3lite.config import ModelConfig
    from m3lite.modelfile import ModelFiles

    cfg = ModelConfig.preset(preset)
    try:
        if ModelFiles.open(path).config == cfg:
            return path
    except M3Error:
        pass
    _run_tool("converters.init", "--preset", preset, "--out", path, "--seed", 0)
    return path


def _median_row(runs: list[dict], extra: dict) -> dict:
    out = {"status": "ok"}
    for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms"):
        out[k] = round(statistics.median(r[k] for r in runs), 3)
    out.update(extra)
    return out


def _run_m3lite(spec: dict, backend: str) -> dict:
    from m3lite.bank import Bank

    m = load_m3lite(spec["model"], spec["precision"])
    # exactly new_tokens tokens: a random (or any) model may produce </s> before that
    m.tokenizer.eos_id, m.tokenizer.eos_ids = -1, ()
    mode = spec["mode"]
    bank = Bank.open(spec["bank"]) if mode != "none" else None
    kw = dict(temperature=0.0, repetition_penalty=1.0, backend=backend, bank=bank,
              mode=mode if mode != "none" else None)
    m.generate(spec["prompt"], max_new_tokens=WARMUP_TOKENS, **kw)
    runs = []
    for _ in range(spec["repeats"]):
        m.generate(spec["prompt"], max_new_tokens=spec["new_tokens"], **kw)
        r = m.last_result
        runs.append({"prefill_tokens_per_s": r.prefill_tokens_per_s, "decode_tokens_per_s": r.decode_tokens_per_s,
                     "ttft_ms": r.ttft_s * 1000, "prompt_tokens": r.prompt_tokens, "new": len(r.tokens),
                     "references": len(r.references)})
    return _median_row(runs, {"prompt_tokens": runs[-1]["prompt_tokens"], "new_tokens": runs[-1]["new"],
                              "references": runs[-1]["references"]})


def greedy_runs(spec: dict, prefill: Callable, step: Callable) -> dict:
    """Time `repeats` greedy generations: prefill(ids) -> last logits; step(token) -> next logits."""
    ids, n_new = spec["prompt"], spec["new_tokens"]

    def once(n: int) -> dict:
        t0 = time.perf_counter()
        logits = prefill(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(logits))
        t2 = time.perf_counter()
        for _ in range(n - 1):
            tok = int(np.argmax(step(tok)))
        t3 = time.perf_counter()
        return {"prefill_tokens_per_s": len(ids) / (t1 - t0), "ttft_ms": (t2 - t0) * 1000,
                "decode_tokens_per_s": (n - 1) / (t3 - t2) if n > 1 else 0.0}

    once(WARMUP_TOKENS)
    runs = [once(n_new) for _ in range(spec["repeats"])]
    return _median_row(runs, {"prompt_tokens": len(ids), "new_tokens": n_new})


def _run_llama_cpp(spec: dict) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise Unavailable("llama-cpp-python is not installed") from None
    from m3lite.modelfile import ModelFiles
    from m3lite.threads import default_threads

    cfg = ModelFiles.open(spec["model"], verify=False).config
    n = default_threads()  # physical cores, as m3lite
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=cfg.max_seq_len, n_batch=512, n_ubatch=512, n_threads=n,
                          n_threads_batch=n, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def logits():  # the last evaluated token's logits, read in place
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return logits()

    def step(tok):
        llm.eval([tok])
        return logits()

    out = greedy_runs(spec, prefill, step)
    out["llama_cpp_version"] = getattr(llama_cpp, "__version__", "?")
    return out


def _row(spec: dict) -> dict:
    rt = spec["runtime"]
    if rt == "m3lite":
        return _run_m3lite(spec, "numba")
    if rt == "onnxruntime":
        return _run_m3lite(spec, "onnxruntime")
    if rt == "llama.cpp":
        return _run_llama_cpp(spec)
    raise BadArgument(f"unknown runtime {rt!r}")


def worker_main(argv: list[str], row: Callable[[dict], dict] = _row) -> int:
    """`python -m m3bench.bench --worker SPEC.json`: run one task, print its result as one JSON line. `row`
    measures a row (m3bench.torch_row passes its PyTorch one: m3lite never imports torch)."""
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m m3bench.bench --worker SPEC.json (use `m3lite bench`)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    baseline = _proc_status_mb("VmRSS") or 0.0
    t0 = time.perf_counter()
    try:
        out = _setup(spec) if spec["task"] == "setup" else row(spec)
    except Unavailable as e:
        out = {"status": "skipped", "reason": str(e)}
    except M3Error as e:
        out = {"status": "failed", "reason": str(e)}
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    out["start_rss_mb"] = round(baseline, 1)  # the interpreter and numpy, before the runtime's imports
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
