"""What a run shows on stderr: a line per finished stage, a heartbeat in logs (not a
terminal), nothing when quiet; the main job reports its stages in order."""

from __future__ import annotations

import io
import time

from test_search import attention_then_ffn

import onnxprune
from onnxprune.progress import ProgressBar, stage_done


def test_stage_lines_and_the_heartbeat_in_a_log():
    log = io.StringIO()
    bar = ProgressBar(stream=log, heartbeat=0.2)
    stage_done(bar, "discover", time.perf_counter() - 1.5)
    bar("score", 3, 10)
    time.sleep(0.7)
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("discover") and "1.50 s" in lines[0]
    assert any(line.startswith("... score 3/10 (") for line in lines[1:])
    assert "[" not in log.getvalue()                  # no bars in a log file


def test_quiet_prints_nothing():
    log = io.StringIO()
    bar = ProgressBar(quiet=True, stream=log, heartbeat=0.1)
    stage_done(bar, "discover", time.perf_counter())
    bar("score", 1, 2)
    time.sleep(0.3)
    bar.close()
    assert log.getvalue() == ""


def test_a_plain_callable_gets_no_stage_calls():
    ticks = []
    stage_done(lambda *a: ticks.append(a), "discover", time.perf_counter())
    assert ticks == []


class _Recorder:
    def __init__(self):
        self.stages: list[str] = []

    def __call__(self, label: str, done: int, total: int) -> None:
        pass

    def stage(self, name: str, seconds: float) -> None:
        assert seconds >= 0
        self.stages.append(name)


def test_the_main_job_reports_its_stages_in_order():
    recorder = _Recorder()
    onnxprune.prune(attention_then_ffn(16), 0.4, method="magnitude", samples=32,
                    batch_size=8, progress=recorder)
    assert recorder.stages == ["load", "discover", "baseline", "score", "plan", "cut+verify",
                               "reconstruct", "evaluate"]
