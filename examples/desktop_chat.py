"""A minimal desktop chat window (Tkinter): answers stream in as they are written, then their sources; Stop
interrupts an answer. The model runs in a worker thread, so the window stays responsive.

    python examples/desktop_chat.py                       # the default model and bank
    python examples/desktop_chat.py --model DIR [--bank DIR] [--mode memory|rag|none]
"""
from __future__ import annotations

import argparse
import queue
import sys
import threading
from pathlib import Path

import m3lite
from m3lite.defaults import default_model_dir, ensure_default_bank


class ChatWindow:
    def __init__(self, root, tk, chat: m3lite.Chat):
        self.root, self.tk, self.chat = root, tk, chat
        self.events: queue.Queue = queue.Queue()  # (kind, value) from the worker thread to the window
        self.stop = threading.Event()
        root.title("m3lite chat")
        self.text = tk.Text(root, wrap="word", width=90, height=30, state="disabled")
        self.text.tag_configure("you", font=("TkDefaultFont", 10, "bold"))
        self.text.tag_configure("sources", foreground="grey40")
        self.text.pack(fill="both", expand=True, padx=6, pady=6)
        bar = tk.Frame(root)
        bar.pack(fill="x", padx=6, pady=(0, 6))
        self.entry = tk.Entry(bar)
        self.entry.pack(side="left", fill="x", expand=True)
        self.entry.bind("<Return>", lambda event: self.send())
        self.send_button = tk.Button(bar, text="Send", command=self.send)
        self.send_button.pack(side="left", padx=(6, 0))
        self.stop_button = tk.Button(bar, text="Stop", command=self.stop.set, state="disabled")
        self.stop_button.pack(side="left", padx=(6, 0))
        where = f"bank {chat.bank.path}, mode {chat.mode}" if chat.bank is not None else "no bank (plain model)"
        self.append(f"m3lite: {Path(chat.model.files.path).name}, {where}\n\n", "sources")
        self.entry.focus_set()
        root.protocol("WM_DELETE_WINDOW", self.close)
        root.after(30, self.poll)

    def append(self, text: str, tag: str | None = None) -> None:
        self.text.configure(state="normal")
        self.text.insert("end", text, tag or ())
        self.text.configure(state="disabled")
        self.text.see("end")

    def send(self) -> None:
        question = self.entry.get().strip()
        if not question or str(self.send_button["state"]) == "disabled":
            return
        self.entry.delete(0, "end")
        self.append(f"You: {question}\n", "you")
        self.send_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.stop.clear()
        threading.Thread(target=self.work, args=(question,), daemon=True).start()

    def work(self, question: str) -> None:  # the worker thread: the only one that touches the model
        try:
            for piece in self.chat.send(question, stream=True, cancel=self.stop.is_set):
                self.events.put(("piece", piece))
            self.events.put(("done", self.chat.last_result))
        except m3lite.M3Error as e:
            self.events.put(("error", str(e)))

    def poll(self) -> None:
        try:
            while True:
                kind, value = self.events.get_nowait()
                if kind == "piece":
                    self.append(value)
                elif kind == "error":
                    self.append(f"error: {value}\n\n", "sources")
                    self.finished()
                else:
                    self.append(" [stopped]\n" if value.finish_reason == "cancelled" else "\n")
                    for n, ref in enumerate(value.references, 1):
                        share = f", {100 * ref['attention']:.1f}% of the attention" if "attention" in ref else ""
                        snippet = " ".join(ref["text"].split())[:140]
                        self.append(f"  [{n}] {ref['title']} ({ref['doc_id']}{share})\n      {snippet}\n", "sources")
                    self.append("\n")
                    self.finished()
        except queue.Empty:
            pass
        self.root.after(30, self.poll)

    def finished(self) -> None:
        self.send_button.configure(state="normal")
        self.stop_button.configure(state="disabled")

    def close(self) -> None:
        self.stop.set()
        self.root.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model directory (default: $M3LITE_MODEL, else the shipped model)")
    ap.add_argument("--bank", type=Path, help="bank directory (default without --model: the default bank)")
    ap.add_argument("--mode", choices=["memory", "rag", "none"])
    args = ap.parse_args()
    try:
        import tkinter as tk
    except ImportError:
        sys.exit("desktop_chat needs Tkinter, which this Python lacks: install it (Debian/Ubuntu: "
                 "`sudo apt install python3-tk`; the python.org installers for macOS and Windows include it)")
    try:
        root = tk.Tk()
    except tk.TclError as e:
        sys.exit(f"desktop_chat cannot open a window ({e}): run it in a desktop session")
    model = m3lite.load(args.model or default_model_dir())
    bank = args.bank
    if bank is None and args.model is None and args.mode != "none":
        print("opening the default bank (built on first use, once)...", file=sys.stderr)
        bank = ensure_default_bank(model, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    ChatWindow(root, tk, model.chat(bank=bank, mode=args.mode))
    root.mainloop()


if __name__ == "__main__":
    try:
        main()
    except m3lite.M3Error as e:
        sys.exit(f"error: {e}")
