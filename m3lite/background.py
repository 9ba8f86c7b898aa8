"""Work a session does while its user is idle: the sentence vectors a bank with lazy vectors still lacks
(m3lite.bank.lazy), computed in a daemon thread a batch at a time, so that dense search covers the whole bank
after a few minutes at the chat prompt. The session holds `busy()` while it answers; the thread then waits, so
the two never compete for the cores and never touch the bank at once."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .bank import Bank, BankBusyError
from .errors import M3Error

BATCH = 32  # references a turn of the thread embeds (~0.3 s on 2 cores): how long an answer may wait for it
BUSY_RETRY_S = 5.0  # another process is writing the bank: look again after this


class VectorFiller:
    """Fill the missing vectors of the bank at `path` with `embed_fn` (the bank's embedder) while idle."""

    def __init__(self, path: str | Path, embed_fn: Callable, batch: int = BATCH):
        self.path = Path(path)
        self.embed_fn = embed_fn
        self.batch = batch
        self._gate = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def missing(bank: Bank) -> int:
        """Live references of `bank` without a sentence vector (0 unless its vectors are lazy)."""
        return max(bank.live_count - bank.embedded_count, 0) if bank.lazy_vectors else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="m3lite-vectors", daemon=True)
        self._thread.start()

    @contextmanager
    def busy(self):
        """Held while the session works: the thread finishes its batch, then waits."""
        with self._gate:
            yield

    def cancel(self) -> None:
        """Ask the thread to stop after the batch in hand (what it computed is kept), without waiting."""
        self._stop.set()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the batch in hand, waiting up to `timeout` seconds for it."""
        self.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        # a damaged bank or another embedder ends the thread: the session meets the same error in its own work
        try:
            bank = Bank.open(self.path)
        except M3Error:
            return
        while not self._stop.is_set():
            with self._gate:
                if self._stop.is_set():
                    break
                try:
                    st = bank.embed(self.embed_fn, batch=self.batch, limit=self.batch)
                except BankBusyError:
                    st = None
                except M3Error:
                    return
            if st is None:
                self._stop.wait(BUSY_RETRY_S)
                continue
            if not st["embedded"]:
                return  # every live reference has its vector
            self._stop.wait(0.01)  # the session takes the gate here when it waits for it
