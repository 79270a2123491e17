"""One progress type for every job, and its adapters (tqdm for the CLI, a plain sink for gradio / HTTP).

A job reports ``progress(phase, done, total, detail)``: ``phase`` names what runs now ("hashing", "merging",
"decoding tiles"), ``done``/``total`` count units of that phase (``total`` may be None when unknown), ``detail``
names the current item (a key, a file). Features take the same ``Progress`` object or a plain callable derived
from it (:meth:`Progress.phase`), so they never know which face shows the bar.

``Progress`` also carries the face's Stop button: :meth:`Progress.check` raises :class:`Cancelled` once
:meth:`Progress.cancel` was called, and long loops call it between units.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Dict, Optional

from .errors import Cancelled

#: ``sink(phase, done, total, detail)``
Sink = Callable[[str, int, Optional[int], str], None]


class Progress:
    """What a job calls to say how far it got; ``Progress()`` alone reports nowhere (tests, library calls)."""

    def __init__(self, sink: Optional[Sink] = None, cancel_event: Optional[threading.Event] = None) -> None:
        self._sink = sink
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self.last: Dict[str, Any] = {}

    # ---- reporting -----------------------------------------------------------------------------------------
    def __call__(self, phase: str, done: int, total: Optional[int] = None, detail: str = "") -> None:
        self.last = {"phase": phase, "done": int(done), "total": None if total is None else int(total),
                     "detail": detail}
        if self._sink is not None:
            self._sink(phase, int(done), None if total is None else int(total), detail)
        self.check()

    def phase(self, name: str, total: Optional[int] = None) -> Callable[..., None]:
        """A ``tick(done, total=None, detail="")`` bound to one phase (what feature loops call)."""
        state = {"total": total}

        def tick(done: int, new_total: Optional[int] = None, detail: str = "") -> None:
            if new_total is not None:
                state["total"] = new_total
            self(name, done, state["total"], detail)

        return tick

    def counter(self, name: str) -> Callable[[int, int, str], None]:
        """The ``(done, total, detail)`` form the merge engine's loops use."""
        return lambda done, total, detail="": self(name, done, total, detail)

    def bytes(self, name: str) -> Callable[[int, int], None]:
        """The ``(done, total)`` form the hashers and readers use (units: bytes)."""
        return lambda done, total: self(name, done, total, "")

    # ---- the Stop button -----------------------------------------------------------------------------------
    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled("stopped by the user; nothing was written")


def as_progress(progress: Any) -> Progress:
    """``None`` -> a silent Progress; a Progress -> itself; a ``sink(phase, done, total, detail)`` -> wrapped."""
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return Progress(progress)
    raise TypeError(f"not a progress reporter: {progress!r}")


def tqdm_progress(stream: Any = None, force: Optional[bool] = None) -> Progress:
    """Bars on stderr, one per phase; quiet when the stream is not a terminal (CI logs, pipes) unless ``force``."""
    stream = stream if stream is not None else sys.stderr
    show = force if force is not None else bool(getattr(stream, "isatty", lambda: False)())
    bars: Dict[str, Any] = {}

    def sink(phase: str, done: int, total: Optional[int], detail: str) -> None:
        if not show:
            return
        from tqdm import tqdm  # light, but only needed when a bar is drawn

        bar = bars.get(phase)
        if bar is None:
            for other in list(bars):  # a new phase closes the previous one
                bars.pop(other).close()
            bar = bars[phase] = tqdm(total=total, desc=phase, file=stream, leave=False, dynamic_ncols=True)
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total is not None and done >= total:
            bars.pop(phase).close()

    return Progress(sink)


__all__ = ["Progress", "Cancelled", "as_progress", "tqdm_progress", "Sink"]
