"""`m3lite chat`: the interactive terminal session over a `Chat` (streaming, Ctrl-C, slash commands, sources)."""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path

from .chat import Chat
from .display import reference_lines
from .errors import BadArgument, M3Error

PROMPT = ">>> "
HELP = """commands:
  /mode memory|rag|none   how the bank is used (memory: explicit memories; rag: references in the prompt)
  /bank PATH              use another bank (/bank off: none)
  /sources on|off         show the references used after each answer
  /temp X                 sampling temperature (0: greedy)
  /max N                  most tokens in an answer
  /reset                  forget the conversation
  /save FILE              save the conversation with its KV state and memories (.npz, resumes instantly)
  /load FILE              continue a saved conversation
  /stats                  speed of the last answer, time to first token, retrieval time, context used
  /quit                   leave (also Ctrl-D; Ctrl-C stops an answer, at the prompt it leaves)"""

# model output is printed raw: keep control characters (escape sequences, backspaces) from reaching the terminal
_CONTROLS = {c: "\ufffd" for c in [*range(0, 9), *range(11, 32), 127, *range(0x80, 0xA0)]}


class Terminal:
    """Output with colour only on a terminal, and never with NO_COLOR set."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.colour = (self.out.isatty() and not os.environ.get("NO_COLOR")
                       and os.environ.get("TERM", "") != "dumb")

    def write(self, text: str, style: str = "") -> None:
        text = text.translate(_CONTROLS) if not style else text
        if self.colour and style:
            text = f"\033[{style}m{text}\033[0m"
        self.out.write(text)
        self.out.flush()

    def line(self, text: str = "", style: str = "") -> None:
        self.write(text, style)
        self.out.write("\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.line(f"note: {text}", "33")

    def error(self, text: str) -> None:
        self.line(f"error: {text}", "31")


def _history_file() -> Path | None:
    try:
        import readline  # noqa: F401  (input() gets line editing and history once it is imported)
    except ImportError:
        return None
    from .modelfile import cache_dir

    return cache_dir() / "chat_history"


class Session:
    """The terminal loop around one Chat."""

    def __init__(self, chat: Chat, term: Terminal | None = None):
        self.chat = chat
        self.term = term or Terminal()
        self.sources = True
        self.filler = None  # m3lite.background.VectorFiller: the bank's missing sentence vectors, while idle

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> None:
        hist = _history_file()
        if hist is not None:
            import readline

            readline.set_history_length(1000)
            if hist.is_file():
                try:
                    readline.read_history_file(hist)
                except OSError:
                    pass
        self.banner()
        self.fill_vectors()
        try:
            self.loop()
        finally:
            if self.filler is not None:
                self.filler.stop(timeout=2.0)
            if hist is not None:
                import readline

                try:
                    hist.parent.mkdir(parents=True, exist_ok=True)
                    readline.write_history_file(hist)
                except OSError:
                    pass

    def loop(self) -> None:
        # Ctrl-C at the prompt leaves, even when this process was started with SIGINT ignored (a background job
        # of a script passes that on): answer() puts back what is set here
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        while True:
            try:
                line = input(PROMPT).strip()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
                self.term.line()
                return
            if not line:
                continue
            try:
                with self.filler.busy() if self.filler is not None else nullcontext():
                    if line.startswith("/"):
                        if self.command(line) == "quit":
                            return
                    else:
                        self.answer(line)
            except M3Error as e:
                self.term.error(str(e))
            except KeyboardInterrupt:  # a second Ctrl-C while an answer was stopping
                self.term.line()
                return

    def banner(self) -> None:
        m, c = self.chat.model, self.chat.model.config
        self.term.line(f"m3lite chat: model {m.files.path} ({c.name}, {c.n_params() / 1e6:.2f} M parameters, "
                       f"context {c.max_seq_len} tokens)", "1")
        if self.chat.bank is None:
            self.term.note("no bank: answering from the model alone (start with --bank BANK, or /bank PATH, "
                           "for explicit memory)")
        else:
            self.term.line(f"bank {self.chat.bank.path} ({self.chat.bank.live_count:,} references), "
                           f"mode {self.chat.mode}")
        self.term.line("Ask a question. /help lists the commands; Ctrl-C stops an answer; Ctrl-D or /quit leaves.",
                       "2")

    # ---- an answer -----------------------------------------------------------------------------------------

    def answer(self, question: str) -> None:
        stop = threading.Event()

        def on_sigint(signum, frame):
            if stop.is_set():
                raise KeyboardInterrupt  # pressed again before the answer stopped: leave
            stop.set()

        old = signal.signal(signal.SIGINT, on_sigint)
        pieces = None
        try:
            pieces = self.chat.send(question, stream=True, cancel=stop.is_set)
            r = self.chat.last_result
            for n in r.notes:  # known before the answer starts (turns dropped from a full context)
                self.term.note(n)
            shown = len(r.notes)
            for piece in pieces:
                self.term.write(piece)
        finally:
            if pieces is not None:
                pieces.close()
            signal.signal(signal.SIGINT, old)
        r = self.chat.last_result
        self.term.line(" [stopped]" if r.finish_reason == "cancelled" else "", "2")
        for n in r.notes[shown:]:
            self.term.note(n)
        if self.sources and r.references:
            self.show_sources(r.references)

    def show_sources(self, refs: list[dict]) -> None:
        self.term.line("Sources:", "1")
        for n, r in enumerate(refs, 1):
            head, text = reference_lines(n, r)
            self.term.line(f"  {head}".translate(_CONTROLS))
            self.term.line(f"      {text}".translate(_CONTROLS), "2")

    # ---- slash commands ------------------------------------------------------------------------------------

    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        chat, term = self.chat, self.term
        if name in ("/quit", "/exit", "/q"):
            return "quit"
        if name in ("/help", "/?"):
            term.line(HELP)
        elif name == "/mode":
            chat.set_mode(_need(arg, "/mode memory|rag|none"))
            term.line(f"mode {chat.mode}")
        elif name == "/bank":
            self.bank(_need(arg, "/bank PATH (or /bank off)"))
        elif name == "/sources":
            if arg not in ("on", "off"):
                raise BadArgument("use /sources on or /sources off")
            self.sources = arg == "on"
            term.line(f"sources {arg}")
        elif name == "/temp":
            chat.temperature = _number(arg, float, "/temp X (a number >= 0; 0 is greedy)", 0)
            term.line(f"temperature {chat.temperature:g}")
        elif name == "/max":
            chat.max_new_tokens = _number(arg, int, "/max N (a whole number >= 1)", 1)
            term.line(f"answers of at most {chat.max_new_tokens} tokens")
        elif name == "/reset":
            chat.reset()
            term.line("conversation cleared")
        elif name == "/save":
            p = chat.save(_need(arg, "/save FILE"))
            term.line(f"saved {_turns(len(chat.turns))} ({chat.context_tokens} tokens of context) to {p}")
        elif name == "/load":
            self.load(_need(arg, "/load FILE"))
        elif name == "/stats":
            self.stats()
        else:
            raise BadArgument(f"unknown command {name}; /help lists the commands")
        return None

    def bank(self, arg: str) -> None:
        chat = self.chat
        if arg.lower() in ("off", "none"):
            chat.set_bank(None)
            self.term.line("no bank; mode none")
            return
        had = chat.bank is not None
        chat.set_bank(Path(arg).expanduser())
        if not had:
            chat.set_mode("memory")
        self.term.line(f"bank {chat.bank.path} ({chat.bank.live_count:,} references), mode {chat.mode}")
        self.fill_vectors()

    def fill_vectors(self) -> None:
        """A bank with lazy vectors gets the ones it lacks in the background while the prompt waits (the
        thread of another bank stops first); said in one line."""
        from .background import VectorFiller
        from .retrieval import bank_embedder

        old, self.filler = self.filler, None
        if old is not None:
            old.cancel()  # the caller holds its gate: it stops at its next turn
        bank = self.chat.bank
        n = VectorFiller.missing(bank) if bank is not None else 0
        if n:
            self.filler = VectorFiller(bank.path, bank_embedder(bank))
            self.filler.start()
            self.term.note(f"{n:,} references of this bank have no sentence vector yet; they are computed while "
                           f"the prompt waits (~{max(1, round(n / 10000))} min in all), and dense search covers "
                           f"each once it has one")

    def load(self, arg: str) -> None:
        new = Chat.load(arg, model=self.chat.model, bank=self.chat.bank)
        self.chat = new
        self.term.line(f"loaded {_turns(len(new.turns))} ({new.context_tokens} tokens of context) from "
                       f"{Path(arg).expanduser()}; mode {new.mode}")
        if new.turns:
            t = new.turns[-1]
            self.term.line(f"  last question: {t.question}".translate(_CONTROLS), "2")

    def stats(self) -> None:
        s = self.chat.stats()
        self.term.line(f"context {s['context_tokens']} of {s['max_context']} tokens, {_turns(s['turns'])}, "
                       f"mode {s['mode']}")
        if "answer_tokens" in s:
            self.term.line(f"last answer: {s['answer_tokens']} tokens, decode {s['decode_tokens_per_s']:.1f} "
                           f"tokens/s, prefill {s['prompt_tokens']} tokens at {s['prefill_tokens_per_s']:.1f} "
                           f"tokens/s, time to first token {s['ttft_ms']:.1f} ms, retrieval {s['retrieval_ms']:.1f} ms")


def _turns(n: int) -> str:
    return f"{n} turn{'' if n == 1 else 's'}"


def _need(arg: str, usage: str) -> str:
    if not arg:
        raise BadArgument(f"usage: {usage}")
    return arg


def _number(arg: str, kind, usage: str, low):
    try:
        x = kind(_need(arg, usage))
    except ValueError:
        raise BadArgument(f"usage: {usage}") from None
    if x < low:
        raise BadArgument(f"usage: {usage}")
    return x


def run_chat(model, bank=None, mode: str | None = None, **settings) -> None:
    """The `m3lite chat` session: `model` loaded, `bank` a path or None (the plain model)."""
    Session(Chat(model, bank=bank, mode=mode, **settings)).run()
