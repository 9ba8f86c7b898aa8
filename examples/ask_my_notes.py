"""Build a bank from a folder of notes, then ask it a question (the answer streams, then its sources).

    python examples/ask_my_notes.py ~/notes "What did I write about volcanoes?"
    python examples/ask_my_notes.py ~/notes "..." --model DIR --bank DIR

The bank goes into the m3lite cache (one per folder and model) unless --bank says where. Running it again
encodes only the notes that are new or changed since (documents already in the bank are skipped).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import m3lite
from m3lite.defaults import default_model_dir
from m3lite.memory import build_or_add
from m3lite.modelfile import cache_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notes", type=Path, help="a folder of .txt, .md or .jsonl notes (or one such file)")
    ap.add_argument("question")
    ap.add_argument("--model", type=Path, help="model directory (default: $M3LITE_MODEL, else the shipped model)")
    ap.add_argument("--bank", type=Path, help="bank directory (default: in the m3lite cache)")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    model = m3lite.load(args.model or default_model_dir())
    notes = args.notes.expanduser().resolve()
    bank_dir = args.bank or cache_dir() / "banks" / (
        f"notes-{notes.name}-{hashlib.sha256(str(notes).encode()).hexdigest()[:8]}-{model.fingerprint[:16]}")

    def progress(stats: dict, total: int) -> None:
        print(f"\rencoding notes: {stats['added']}/{total} references", end="", file=sys.stderr, flush=True)

    stats = build_or_add(model, bank_dir, [str(notes)], progress=progress,
                         warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    print(f"\n{stats['bank']}: {stats['count']} references ({stats['added']} new)", file=sys.stderr)

    bank = m3lite.Bank.open(bank_dir)
    # the model's own chat format and default mode (rag for imported models, memory for models trained here);
    # retrieval searches with the question alone
    for piece in model.ask(args.question, bank=bank, stream=True, max_new_tokens=args.max_tokens):
        print(piece, end="", flush=True)
    print()
    result = model.last_result
    print("\nSources:")
    for n, ref in enumerate(result.references, 1):
        snippet = " ".join(ref["text"].split())[:120]
        share = f", {100 * ref['attention']:.1f}% of the attention" if "attention" in ref else ""
        print(f"[{n}] {ref['title']} ({ref['doc_id']}), score {ref['score']}{share}")
        print(f"    {snippet}")


if __name__ == "__main__":
    try:
        main()
    except m3lite.M3Error as e:  # one line, no traceback, as the m3lite command does
        sys.exit(f"error: {e}")
