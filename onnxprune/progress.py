"""Progress bars on stderr for long passes; silent when stderr is not a terminal or quiet."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = not quiet and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start: dict[str, float] = {}

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        began = self.start.setdefault(label, time.perf_counter())
        width = 30
        filled = int(width * done / total)
        elapsed = time.perf_counter() - began
        eta = elapsed / done * (total - done) if done else 0.0
        self.stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                          f"{elapsed:.0f}s eta {eta:.0f}s ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
