"""Progress events from a running sweep to whoever listens in this process (flows/console.py).

The flows emit; nothing here knows how events are shown. Listeners run in the emitting thread
(cells run in threads), so they must be quick and thread-safe.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Event:
    kind: str  # planned | started | finished | failed | cell_done | cell_failed | published
    cell: str = ""  # model/recipe
    stage: str = ""
    cached: bool = False
    seconds: float = 0.0
    detail: str = ""
    stored: tuple = ()  # planned: the stages the store already holds
    at: float = field(default_factory=time.time)


_listeners: list[Callable[[Event], None]] = []
_lock = threading.Lock()


def listen(fn: Callable[[Event], None]) -> Callable[[], None]:
    """Call fn on every event from now on; returns the function that stops it."""
    with _lock:
        _listeners.append(fn)

    def stop():
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)
    return stop


def emit(kind: str, cell: str = "", stage: str = "", **info) -> None:
    with _lock:
        listeners = list(_listeners)
    for fn in listeners:
        fn(Event(kind, cell, stage, **info))
