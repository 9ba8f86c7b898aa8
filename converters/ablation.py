"""The memory ablation's table and chart, from the JSON files the recipe writes (`recipes/memory-ablation.sh`),
and the small held-out Wikipedia bank it evaluates on.

    python -m converters.ablation report DIR [--out REPORT]   -> REPORT.md (the table) and REPORT.png (the chart)
    python -m converters.ablation wiki-bank --model M --out BANK [--articles 50]
        a bank of the first N held-out articles `m3lite eval --limit N` asks about (one encoding per setting
        instead of all ~1,000 held-out articles: the ablation's 12 settings would take hours)

DIR holds one folder per setting, named LAYERS-TOKENS-VARIANT[-QUANT] (layers: half | all; tokens: 8 | 32 | all;
variant: unadapted | adapted; quant: int8 when absent, int4 or pq), each with the outputs of m3lite's commands:

    build.json     `m3lite bank build ... --json` on the made-up-facts notes (references encoded per second)
    info.json      `m3lite bank info ... --json` (memory bytes per reference)
    facts-r1.json  `m3lite eval --qa ... --refs 1 --json` (made-up facts, one reference per question)
    facts-r5.json  the same with --refs 5 (optional)
    wiki-r1.json   `m3lite eval ... --refs 1 --json` on held-out Wikipedia articles (optional)
    steps.txt      the adapted setting's training steps (optional)

Eval files that also ran the modes none and rag give the baseline rows (per variant: base or adapted model).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from m3lite.errors import BadArgument, M3Error
from m3lite.modelfile import atomic_write_bytes
from m3lite.plot import scatter_chart

NAME = re.compile(r"^(half|all)-(8|32|all)-(unadapted|adapted)(?:-(int8|int4|pq))?$")
LAYERS = {"half": "first half", "all": "all"}


def _read(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadArgument(f"{path} is not a JSON result ({e})") from None
    if not isinstance(d, dict):
        raise BadArgument(f"{path} is not a JSON object")
    return d


def _mode(ev: dict | None, mode: str, key: str) -> float | None:
    m = (ev or {}).get("modes", {}).get(mode)
    return None if m is None or m.get(key) is None else float(m[key])


def collect(root: Path) -> tuple[list[dict], list[dict]]:
    """(settings, baselines): a row per setting folder, and the none/rag rows found in their eval files."""
    rows, base = [], {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = NAME.match(d.name)
        if m is None:
            continue
        layers, tokens, variant, quant = m.groups()
        facts1, facts5, wiki = (_read(d / f) for f in ("facts-r1.json", "facts-r5.json", "wiki-r1.json"))
        info, build = _read(d / "info.json"), _read(d / "build.json")
        steps = (d / "steps.txt").read_text().strip() if (d / "steps.txt").is_file() else ""
        rows.append({
            "name": d.name, "layers": layers, "tokens": tokens, "variant": variant, "quant": quant or "int8",
            "steps": int(steps) if steps.isdigit() else None,
            "facts_1": _pct(_mode(facts1, "memory", "contains")), "facts_5": _pct(_mode(facts5, "memory", "contains")),
            "wiki_f1": _pct(_mode(wiki, "memory", "f1")),
            "bytes_per_ref": (info or {}).get("memory_record_bytes"),
            "refs_per_s": (build or {}).get("references_per_s"),
            "ttft_ms": _mode(facts1 or facts5, "memory", "ttft_ms"),
            "decode": _mode(facts1 or facts5, "memory", "decode_tokens_per_s")})
        for mode in ("none", "rag"):
            for key, ev in (("facts_1", facts1), ("facts_5", facts5), ("wiki_f1", wiki)):
                v = _mode(ev, mode, "f1" if key == "wiki_f1" else "contains")
                if v is not None:
                    b = base.setdefault((mode, variant), {"name": mode, "variant": variant})
                    b.setdefault(key, _pct(v))
                    if key == "facts_1" or "ttft_ms" not in b:
                        b["ttft_ms"] = _mode(ev, mode, "ttft_ms")
                        b["decode"] = _mode(ev, mode, "decode_tokens_per_s")
    return rows, list(base.values())


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 1)


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else f"{v:,}"


def markdown(rows: list[dict], baselines: list[dict]) -> str:
    head = ("| memory layers | tokens per KV head | model | memories | made-up facts contains % (1 ref) | "
            "(5 refs) | held-out Wikipedia F1 (1 ref) | bytes per reference | refs encoded/s | TTFT ms | "
            "decode tok/s |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    out = [head]
    key = {"half": 0, "all": 1}, {"8": 0, "32": 1, "all": 2}, {"unadapted": 0, "adapted": 1}
    for r in sorted(rows, key=lambda r: (key[0][r["layers"]], key[1][r["tokens"]], key[2][r["variant"]],
                                         r["quant"] != "int8")):
        model = r["variant"] + (f", {r['steps']} steps" if r["steps"] else "")
        out.append(f"| {LAYERS[r['layers']]} | {r['tokens'] if r['tokens'] != 'all' else 'all (<= 128)'} | "
                   f"{model} | {r['quant']} | {_f(r['facts_1'])} | {_f(r['facts_5'])} | {_f(r['wiki_f1'])} | "
                   f"{_f(r['bytes_per_ref'])} | {_f(r['refs_per_s'])} | {_f(r['ttft_ms'], 0)} | "
                   f"{_f(r['decode'], 0)} |")
    for b in baselines:
        out.append(f"| {b['name']} (no memory) | | {b['variant']} | | {_f(b.get('facts_1'))} | {_f(b.get('facts_5'))} | "
                   f"{_f(b.get('wiki_f1'))} | | | {_f(b.get('ttft_ms'), 0)} | {_f(b.get('decode'), 0)} |")
    return "\n".join(out) + "\n"


def chart(rows: list[dict]) -> bytes:
    """Made-up facts `contains` (one reference) against memory bytes per reference, a series per variant."""
    series = []
    for variant in ("unadapted", "adapted"):
        pts = [(r["bytes_per_ref"], r["facts_1"], f"{r['layers']}/{r['tokens']}"
                + ("" if r["quant"] == "int8" else f"/{r['quant']}"))
               for r in rows if r["variant"] == variant and r["bytes_per_ref"] and r["facts_1"] is not None]
        series.append((f"{variant}: made-up facts contains % (1 reference)", sorted(pts)))
    return scatter_chart(series, "memory bytes per reference", "contains %", y_max=100)


def wiki_bank(model_dir: Path, out: Path, articles: int, quant: str = "int8") -> dict:
    """Build `out`: the first `articles` held-out English articles that `m3lite eval --limit` takes, in its
    order (held out, with a description), encoded by the model at `model_dir`. Returns the build statistics."""
    from m3lite.heldout import is_held_out
    from m3lite.memory import build_or_add
    from m3lite.model import Model
    from m3lite.sources import wiki_articles, wiki_documents

    if articles < 1:
        raise BadArgument(f"--articles must be at least 1, got {articles}")
    want = [t for t, a in wiki_articles("en").items() if is_held_out(t) and a["description"]][:articles]
    docs = {d.title: d for d in wiki_documents("en", "wiki:en:heldout", held_out=True)}
    return build_or_add(Model.load(model_dir), out, [docs[t] for t in want if t in docs], quant=quant)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="the table and chart of a results folder")
    r.add_argument("dir", type=Path, help="the ablation's results folder")
    r.add_argument("--out", type=Path, help="report path without suffix (default DIR/ablation)")
    w = sub.add_parser("wiki-bank", help="a bank of the first N held-out Wikipedia articles")
    w.add_argument("--model", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--articles", type=int, default=50)
    w.add_argument("--quant", default="int8", help="how memories are stored (as `m3lite bank build --quant`)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "wiki-bank":
            print(json.dumps(wiki_bank(a.model, a.out, a.articles, a.quant)))
            return 0
        if not a.dir.is_dir():
            raise BadArgument(f"{a.dir} is not a folder")
        rows, base = collect(a.dir)
        if not rows:
            raise BadArgument(f"{a.dir} holds no setting folders (LAYERS-TOKENS-VARIANT, e.g. half-8-adapted)")
        out = a.out or a.dir / "ablation"
        table = markdown(rows, base)
        atomic_write_bytes(out.with_suffix(".md"), table.encode())
        atomic_write_bytes(out.with_suffix(".png"), chart(rows))
    except M3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(table)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
