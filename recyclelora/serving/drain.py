"""Graceful stop for the model process: finish the frames already being served.

On SIGTERM the HTTP front stops taking requests but finishes the ones in flight, and each of
those still sends crops to the model process. So the model process must outlive them: its stop
signal is held until no crop has been asked for ``idle_s`` (the front is done) or ``max_s``
passed, then handed to the server's own handler (uvicorn's graceful shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


class Drain:
    def __init__(self, idle_s: float = 1.5, max_s: float = 25.0) -> None:
        self.idle_s = idle_s
        self.max_s = max_s  # below the process manager's 30 s before it kills
        self._active = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Wrap each request: the drain waits for it."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._last = time.monotonic()

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self._active else time.monotonic() - self._last

    def wait(self) -> None:
        """Block until idle for ``idle_s`` or ``max_s`` passed."""
        deadline = time.monotonic() + self.max_s
        while self.idle_for() < self.idle_s and time.monotonic() < deadline:
            time.sleep(0.05)

    def install(self, sig: int = signal.SIGTERM) -> None:
        """Hold ``sig`` until drained, then pass it to the handler installed before (call from
        the main thread, after the server installed its handlers)."""
        previous = signal.getsignal(sig)
        if not callable(previous):
            return  # no server handler to hand over to: keep the default behaviour

        def later(signum: int, frame) -> None:
            log.info("stop requested: finishing the requests in flight")
            self.wait()
            previous(signum, frame)

        def handler(signum: int, frame) -> None:
            threading.Thread(target=later, args=(signum, frame), daemon=True).start()

        signal.signal(sig, handler)
