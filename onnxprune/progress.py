"""What a long run shows on stderr: a bar per long pass on a terminal, a line per finished
stage with its time, and — when stderr is a log file, as in CI — a heartbeat line at least
every ``heartbeat`` seconds so the log shows life. ``quiet`` silences all of it."""

from __future__ import annotations

import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import ClassVar

from onnxprune.memory import release_memory

Progress = Callable[[str, int, int], None]


class ProgressBar:
    _live: ClassVar[weakref.WeakSet[ProgressBar]] = weakref.WeakSet()

    def __init__(self, quiet: bool = False, stream=None, heartbeat: float = 10.0):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = not quiet and self.tty          # the bars
        self.heartbeat = heartbeat
        self.start: dict[str, float] = {}
        self.began = time.perf_counter()
        self.doing = "starting"                        # what the heartbeat reports
        self._lock = threading.Lock()
        self._last_line = self.began
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        ProgressBar._live.add(self)

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.quiet or total <= 0:
            return
        self.doing = f"{label} {done}/{total}"
        self._start_heartbeat()
        if not self.tty:
            return
        began = self.start.setdefault(label, time.perf_counter())
        width = 30
        filled = int(width * done / total)
        elapsed = time.perf_counter() - began
        eta = elapsed / done * (total - done) if done else 0.0
        self._write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                    f"{elapsed:.0f}s eta {eta:.0f}s " + ("\n" if done >= total else ""))

    def stage(self, name: str, seconds: float) -> None:
        """Stage ``name`` finished after ``seconds``: one line."""
        if self.quiet:
            return
        self.doing = f"after {name}"
        self._start_heartbeat()
        total = time.perf_counter() - self.began
        self._write(f"{name:<12}{seconds:8.2f} s   (elapsed {total:.1f} s)\n")

    def close(self) -> None:
        self._stop.set()

    @classmethod
    def close_all(cls) -> None:
        """Stop every heartbeat (the command is over)."""
        for bar in list(cls._live):
            bar.close()

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()
            self._last_line = time.perf_counter()

    def _start_heartbeat(self) -> None:
        if self.tty or self._beat is not None or self.heartbeat <= 0:
            return
        self._beat = threading.Thread(target=self._beating, daemon=True)
        self._beat.start()

    def _beating(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat)):
            now = time.perf_counter()
            if now - self._last_line >= self.heartbeat:
                try:
                    self._write(f"... {self.doing} ({now - self.began:.0f} s)\n")
                except (OSError, ValueError):       # the stream was closed: stop beating
                    return


def stage_done(progress: Progress | None, name: str, since: float) -> float:
    """A stage boundary: tell ``progress`` (when it reports stages) that stage ``name``,
    begun at ``since`` (``time.perf_counter()``), is done, and hand the heap the stage freed
    back to the system; the time now, where the next stage begins."""
    now = time.perf_counter()
    report = getattr(progress, "stage", None)
    if report is not None:
        report(name, now - since)
    release_memory()
    return time.perf_counter()
