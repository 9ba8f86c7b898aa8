"""`m3lite bench`: the JSON it reports and the report file (speeds are never asserted, only that they exist)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
from clitools import one_line_error, run

from m3bench.bench import (LOAD_ROWS, ROWS, BusyCore, _add_ratios, _merge_rounds, run_bench,
                           weight_bytes_per_token)
from m3lite.config import ModelConfig
from m3lite.errors import BadArgument
from m3lite.modelfile import cache_dir


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir, tmp_path_factory):
    """One `m3lite bench --preset tiny --json --repeats 1 --under-load --report FILE.md` in an empty cache (the
    tokenizers are copied in, so nothing is trained again)."""
    tiny_model_dir()  # the tiny tokenizer is in the user's cache now
    tmp = tmp_path_factory.mktemp("bench")
    cache = tmp / "cache"
    shutil.copytree(cache_dir() / "tokenizers", cache / "tokenizers")
    env = dict(os.environ, M3LITE_CACHE=str(cache))
    p = run("bench", "--preset", "tiny", "--json", "--repeats", 1, "--under-load", "--report", tmp / "bench.md", env=env,
            timeout=1800)
    return json.loads(p.stdout), tmp / "bench.md"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_json_structure(bench_run):
    res, _ = bench_run
    assert res["model"]["name"] == "tiny" and res["model"]["preset"] == "tiny"
    assert res["settings"]["prompt_tokens"] == 128 and res["settings"]["new_tokens"] == 128
    assert res["settings"]["batch"] == 1 and res["settings"]["repeats"] == 1
    assert res["machine"]["copy_bandwidth_gb_s"] > 0 and res["machine"]["physical_cores"] >= 1
    assert [(r["runtime"], r["precision"], r["mode"]) for r in res["rows"]] == ROWS + LOAD_ROWS
    assert [r["load"] for r in res["rows"]] == ["quiet"] * len(ROWS) + ["1 busy process"] * len(LOAD_ROWS)
    llama = _installed("llama_cpp")
    assert res["baseline"] == ("llama.cpp" if llama else "m3lite fp32")
    for r in res["rows"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"]
            continue
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "peak_rss_mb", "weight_bytes_per_token",
                  "bandwidth_fraction"):
            assert r[k] > 0, (k, r)
        assert r["new_tokens"] == 128
        assert r["prompt_tokens"] == 128 if r["mode"] != "rag" else r["prompt_tokens"] > 128
        assert r["ratio_to"].startswith("llama.cpp" if llama else "m3lite fp32")
        assert all(v > 0 for v in r["ratio"].values())
        if r["mode"] == "memory":
            assert r["references"] >= 5  # 5 per 64-token chunk
    status = {(r["runtime"], r["precision"], r["mode"]): r["status"] for r in res["rows"] if r["load"] == "quiet"}
    for mode in ("none", "memory", "rag"):
        assert status["m3lite", "fp32", mode] == "ok"
    assert status["onnxruntime", "fp32", "none"] == "ok"
    assert (status["pytorch", "fp32", "none"] == "ok") == _installed("torch")
    assert (status["llama.cpp", "fp32", "none"] == "ok") == llama
    assert "fp32_decode_memory_over_none" in res["memory"] and "fp32_ttft_memory_over_rag" in res["memory"]


@pytest.mark.slow
def test_under_load_rows_are_compared_with_the_quiet_ones(bench_run):
    res, _ = bench_run
    ul = res["under_load"]
    assert ul["load"] == "1 busy process" and {"m3lite fp32", "m3lite int8", "onnxruntime fp32"} <= set(ul["kept"])
    for k, v in ul["kept"].items():
        assert v["decode"] > 0 and v["ttft"] > 0, k
    loaded = [r for r in res["rows"] if r["load"] != "quiet" and r["status"] == "ok"]
    assert loaded and all(r["ratio_to"] for r in loaded)  # ratios within the loaded rows
    if _installed("llama_cpp"):
        assert ul["m3lite_int8_over_llama_cpp_under_load"]["decode"] > 0


def test_busy_core_burns_a_core_while_it_lasts():
    import time

    def cpu_ticks(pid):  # utime + stime
        with open(f"/proc/{pid}/stat") as f:
            return sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])

    with BusyCore() as busy:
        before = cpu_ticks(busy.p.pid)
        time.sleep(0.3)
        assert busy.p.poll() is None and cpu_ticks(busy.p.pid) > before  # alive, and it never sleeps
    assert busy.p.poll() is not None  # gone after the block


@pytest.mark.slow
def test_report_file(bench_run):
    res, md = bench_run
    text = md.read_text()
    assert res["report"] == str(md)
    assert "| runtime |" in text and "m3lite" in text and "onnxruntime" in text
    assert "| 1 busy process |" in text and "Under load (1 busy process)" in text


def test_weight_bytes_per_token():
    for tied in (True, False):
        cfg = ModelConfig.preset("tiny", tie_embeddings=tied)
        embedding_only = 0 if tied else cfg.vocab_size * cfg.dim  # the input embedding is read one row at a time
        assert weight_bytes_per_token(cfg.to_dict(), "fp32") == 4 * (cfg.n_params() - embedding_only)
        assert weight_bytes_per_token(cfg.to_dict(), "int8") < weight_bytes_per_token(cfg.to_dict(), "fp32") / 3


def test_ratios_prefer_llama_cpp_at_the_same_precision():
    def row(runtime, precision, decode):
        return {"runtime": runtime, "precision": precision, "mode": "none", "status": "ok", "decode_tokens_per_s":
                decode, "prefill_tokens_per_s": 1.0, "ttft_ms": 1.0, "peak_rss_mb": 1.0}

    rows = [row("m3lite", "fp32", 100.0), row("m3lite", "int8", 300.0), row("llama.cpp", "fp32", 50.0),
            row("llama.cpp", "int8", 150.0)]
    assert _add_ratios(rows) == "llama.cpp"
    assert rows[0]["ratio_to"] == "llama.cpp F32" and rows[0]["ratio"]["decode_tokens_per_s"] == 2.0
    assert rows[1]["ratio_to"] == "llama.cpp Q8_0" and rows[1]["ratio"]["decode_tokens_per_s"] == 2.0
    rows = rows[:2]
    assert _add_ratios(rows) == "m3lite fp32"
    assert rows[1]["ratio_to"] == "m3lite fp32" and rows[1]["ratio"]["decode_tokens_per_s"] == 3.0


def test_rounds_take_medians_and_ratios_within_each_round():
    """--rounds: a row's figure is the median over the rounds, its ratio the median of the ratios each round
    measured against its own reference (a machine twice as fast in round 2 moves both), peak RSS the largest;
    a row that no round ran stays as it was reported."""
    def row(runtime, decode, rss=10.0):
        return {"runtime": runtime, "precision": "int8", "mode": "none", "status": "ok", "decode_tokens_per_s":
                decode, "prefill_tokens_per_s": decode, "ttft_ms": 1000 / decode, "peak_rss_mb": rss}

    skipped = {"runtime": "pytorch", "precision": "fp32", "mode": "none", "status": "skipped", "reason": "no"}
    rounds = [[row("m3lite", 120.0, 30.0), row("llama.cpp", 100.0), dict(skipped)],
              [row("m3lite", 240.0, 31.0), row("llama.cpp", 200.0), dict(skipped)],
              [row("m3lite", 90.0, 29.0), row("llama.cpp", 100.0), dict(skipped)]]
    for rows in rounds:
        _add_ratios(rows)
    m3, ref, sk = _merge_rounds(rounds)
    assert m3["decode_tokens_per_s"] == 120.0 and ref["decode_tokens_per_s"] == 100.0
    assert m3["ratio"]["decode_tokens_per_s"] == 1.2  # per round 1.2, 1.2, 0.9
    assert m3["peak_rss_mb"] == 31.0 and m3["rounds"]["decode_tokens_per_s"] == [120.0, 240.0, 90.0]
    assert sk == skipped and "rounds" not in sk
    assert _merge_rounds(rounds[:1]) is rounds[0]


def test_errors_are_one_line(tmp_path):
    one_line_error(run("bench", "--model", tmp_path / "missing", check=False))
    one_line_error(run("bench", "--model", tmp_path, "--preset", "tiny", check=False))
    with pytest.raises(BadArgument, match="rounds"):
        run_bench(preset="tiny", rounds=0)
    one_line_error(run("bench", "--preset", "huge", check=False))
    one_line_error(run("bench", "--preset", "tiny", "--report", tmp_path / "r.txt", check=False))


def test_thread_settings_are_m3lite_own_and_peers_run_without_them():
    """import m3lite sets its thread defaults only where the user set none, and M3LITE_KEEP_ENV (what bench
    gives its peers' workers) sets nothing, so llama.cpp, onnxruntime and PyTorch run as users run them."""
    import subprocess
    import sys

    code = "import os, m3lite; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"

    def run(**extra):
        env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT",
                                                                "M3LITE_KEEP_ENV")}
        return subprocess.run([sys.executable, "-c", code], env=env | extra, capture_output=True, text=True,
                              check=True).stdout.split()

    assert run() == ["30000", "18"]
    assert run(GOMP_SPINCOUNT="7") == ["7", "18"]
    assert run(M3LITE_KEEP_ENV="1") == ["None", "None"]
