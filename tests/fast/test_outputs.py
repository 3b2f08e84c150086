"""What a run writes (issue 15, "data loss and leftovers"): every output that is a file the
run reads, or another output, is refused before any work; the model is written first and
the report last, atomically, with the user's umask; a failure, Ctrl-C or SIGTERM leaves
nothing behind; a full disk or read-only folder is one line and exit 2."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnx
import pytest
from opgraphs import attention_model

from onnxprune import modelio, outputs
from onnxprune.cli import main

CUT = ["--remove", "attn0.head1"]
PRUNE = ["--ratio", "0.3", "--quiet", "--samples", "8"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file in the folder (hidden ones too) and its sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("onnxprune: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def job(tmp_path) -> Path:
    """A folder with a small attention model, model.onnx."""
    onnx.save(attention_model(), str(tmp_path / "model.onnx"))
    return tmp_path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts loading its model (the checks come first)."""
    def refuse(*args, **kwargs):
        pytest.fail("the work started before the outputs were checked")

    import onnxprune.cli

    monkeypatch.setattr(onnxprune.cli, "load_model", refuse)
    for name in ("bench", "evaluate"):
        monkeypatch.setattr(onnxprune.cli.api, name, refuse)


def external(folder: Path, location: str = "model.onnx.data") -> Path:
    """model.onnx with its weights in ``location`` (relative to the folder)."""
    path = folder / "model.onnx"
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(attention_model(), str(path), save_as_external_data=True, location=location,
              size_threshold=0)
    return path


# --- 1. an output that is a file the run reads, or another output: refused before work ---

@pytest.mark.parametrize("case", [
    "cut_over_external_data", "cut_over_nested_external_data", "cut_side_file_over_data",
    "cut_over_input_by_symlink", "prune_over_calib", "report_over_calib",
    "report_over_output", "report_over_input", "finetune_over_train", "finetune_over_val",
    "score_plot_over_input", "bench_json_over_model", "bench_json_over_plot",
    "inspect_json_over_input", "eval_json_over_data", "cut_over_config"])
def test_an_output_that_is_an_input_is_refused_before_any_work(job, capsys, no_work, case):
    m = str(job / "model.onnx")
    for name in ("calib.npz", "train.npz", "val.npz"):   # content never read
        (job / name).write_bytes(b"data the run reads")
    argv, expected = {
        "cut_over_external_data": (["cut", m, str(job / "model.onnx.data"), *CUT],
                                   "external data"),
        "cut_over_nested_external_data": (["cut", m, str(job / "w" / "weights.bin"), *CUT],
                                          "external data"),
        "cut_side_file_over_data": (["cut", m, str(job / "model.onnx.x"), *CUT],
                                    None),
        "cut_over_input_by_symlink": (["cut", m, str(job / "link.onnx"), *CUT], "input file"),
        "prune_over_calib": ([m, str(job / "calib.npz"), *PRUNE, "--calib",
                              str(job / "calib.npz")], "--calib"),
        "report_over_calib": ([m, str(job / "out.onnx"), *PRUNE, "--calib",
                               str(job / "calib.npz"), "--report", str(job / "calib.npz")],
                              "--calib"),
        "report_over_output": ([m, str(job / "out.onnx"), *PRUNE, "--report",
                                str(job / "out.onnx")], "output path"),
        "report_over_input": ([m, str(job / "out.onnx"), *PRUNE, "--report", m], "input"),
        "finetune_over_train": (["finetune", m, str(job / "train.npz"), "--steps", "1",
                                 "--train", str(job / "train.npz")], "--train"),
        "finetune_over_val": (["finetune", m, str(job / "val.npz"), "--steps", "1",
                               "--train", str(job / "train.npz"), "--val",
                               str(job / "val.npz")], "--val"),
        "score_plot_over_input": (["score", m, "--plot", m], "input file"),
        "bench_json_over_model": (["bench", m, "--json", m], "input"),
        "bench_json_over_plot": (["bench", m, "--json", str(job / "b.png"), "--plot",
                                  str(job / "b.png")], "also"),
        "inspect_json_over_input": (["inspect", str(job / "model.pb"), "--json",
                                     str(job / "model.pb")], "input file"),
        "eval_json_over_data": (["eval", m, "--data", str(job / "val.npz"), "--json",
                                 str(job / "val.npz")], "--data"),
        "cut_over_config": (["cut", m, str(job / "cut.toml"), "--config",
                             str(job / "cut.toml")], "--config"),
    }[case]
    if case == "cut_over_external_data":
        external(job)
    elif case == "cut_over_nested_external_data":
        external(job, "w/weights.bin")
    elif case == "cut_side_file_over_data":
        # the output's own side file <out>.data would be the input's external data
        external(job, "model.onnx.x.data")
        expected = "external-data file"
    elif case == "cut_over_input_by_symlink":
        (job / "link.onnx").symlink_to(job / "model.onnx")
    elif case == "cut_over_config":
        (job / "cut.toml").write_text('remove = "attn0.head1"\n')
    elif case == "inspect_json_over_input":   # (--json X.onnx reads as the flag, then a model)
        (job / "model.pb").write_bytes((job / "model.onnx").read_bytes())
    before = snapshot(job)
    nested = snapshot(job / "w") if (job / "w").exists() else None
    assert main(argv) == 2
    assert expected in one_line_error(capsys)
    assert snapshot(job) == before
    if nested is not None:
        assert snapshot(job / "w") == nested


def test_external_data_paths_are_read_without_the_data(job):
    path = external(job, "w/weights.bin")
    (job / "w" / "weights.bin").unlink()   # not loaded: a missing file is still named
    assert outputs.external_data_paths(path) == [job / "w" / "weights.bin"]
    assert outputs.external_data_paths(job / "nope.onnx") == []


@pytest.mark.parametrize("case", ["report_folder_missing", "output_folder_missing",
                                  "output_is_a_folder", "folder_not_writable",
                                  "plot_not_an_image", "plot_needs_matplotlib"])
def test_output_locations_are_checked_before_any_work(job, capsys, no_work, monkeypatch,
                                                      case):
    m, out = str(job / "model.onnx"), str(job / "out.onnx")
    argv, expected = {
        "report_folder_missing": ([m, out, *PRUNE, "--report", str(job / "no" / "r.json")],
                                  "does not exist"),
        "output_folder_missing": (["cut", m, str(job / "no" / "o.onnx"), *CUT],
                                  "does not exist"),
        "output_is_a_folder": (["cut", m, str(job), *CUT], "is a directory"),
        "folder_not_writable": ([m, out, *PRUNE], "not writable"),
        "plot_not_an_image": (["score", m, "--plot", str(job / "scores.npz")],
                              "not an image extension"),
        "plot_needs_matplotlib": (["score", m, "--plot", str(job / "scores.png")],
                                  "needs matplotlib"),
    }[case]
    if case == "folder_not_writable":   # as root every folder is writable: ask os.access
        monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    if case == "plot_needs_matplotlib":
        monkeypatch.setattr(outputs.importlib.util, "find_spec", lambda name: None)
    before = snapshot(job)
    assert main(argv) == 2
    assert expected in one_line_error(capsys)
    assert snapshot(job) == before


def test_check_output_path_keeps_its_contract(job):
    external(job)
    with pytest.raises(outputs.OnnxpruneError, match="input file"):
        modelio.check_output_path(job / "model.onnx", job / "model.onnx")
    with pytest.raises(outputs.OnnxpruneError, match="external data"):
        modelio.check_output_path(job / "model.onnx", job / "model.onnx.data")
    modelio.check_output_path(job / "model.onnx", job / "other.onnx")


# --- 2. the model first, the report last; a failure or a signal leaves nothing ----------

def test_model_written_before_report_both_atomic(job, monkeypatch):
    order = []
    commit = outputs.TempFile.commit

    def record(self):
        assert Path(self.path).exists() and Path(self.path).parent == self.target.parent
        order.append(self.target.name)
        commit(self)

    monkeypatch.setattr(outputs.TempFile, "commit", record)
    assert main([str(job / "model.onnx"), str(job / "out.onnx"), *PRUNE, "--report",
                 str(job / "r.json")]) == 0
    assert order == ["out.onnx", "r.json"]
    assert json.loads((job / "r.json").read_text())["output"] == str(job / "out.onnx")
    assert not [p for p in job.iterdir() if p.name.startswith(".")]


def test_quality_gate_writes_the_report_and_not_the_model(job):
    assert main([str(job / "model.onnx"), str(job / "out.onnx"), *PRUNE, "--max-drop", "0",
                 "--report", str(job / "r.json")]) == 3
    assert not (job / "out.onnx").exists()
    report = json.loads((job / "r.json").read_text())
    assert report["output"] is None   # the report never names a model that is not there
    assert sorted(p.name for p in job.iterdir()) == ["model.onnx", "r.json"]


def fail_on_fsync(monkeypatch, call: int, exc: BaseException) -> None:
    """The ``call``-th fsync of an output raises ``exc`` (1: the model, 2: the report)."""
    calls = []
    real = outputs._fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == call:
            raise exc
        real(fd)

    monkeypatch.setattr(outputs, "_fsync", fsync)


@pytest.mark.parametrize("exc,code,message", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2, "r.json: cannot write: No space"),
    (KeyboardInterrupt(), 130, "interrupted; nothing written"),
    (outputs.Terminated(), 143, "terminated (SIGTERM); nothing written"),
])
def test_a_report_that_fails_takes_the_model_with_it(job, capsys, monkeypatch, exc, code,
                                                     message):
    fail_on_fsync(monkeypatch, 2, exc)
    before = snapshot(job)
    assert main([str(job / "model.onnx"), str(job / "out.onnx"), *PRUNE, "--report",
                 str(job / "r.json")]) == code
    assert message in one_line_error(capsys)
    assert snapshot(job) == before   # no model, no report, no temp file


SIGTERM_RUNNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from onnxprune import outputs
    from onnxprune.cli import main

    marker, call = Path(sys.argv[1]), int(sys.argv[2])
    calls, real = [], outputs._fsync

    def slow(fd):   # the call-th output write stalls, as a large model's save does
        calls.append(fd)
        if len(calls) == call:
            marker.write_text("saving")
            time.sleep(120)
        real(fd)

    outputs._fsync = slow
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize("call", [1, 2], ids=["while_saving_the_model",
                                              "while_writing_the_report"])
def test_sigterm_cleans_up_like_ctrl_c(job, tmp_path_factory, call):
    side = tmp_path_factory.mktemp("side")
    runner, marker = side / "runner.py", side / "marker"
    runner.write_text(SIGTERM_RUNNER)
    before = snapshot(job)
    proc = subprocess.Popen(
        [sys.executable, str(runner), str(marker), str(call), str(job / "model.onnx"),
         str(job / "out.onnx"), *PRUNE, "--report", str(job / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    if call == 1:   # the temp file of the model is there, half written
        assert [p for p in job.iterdir() if p.name.startswith(".out.onnx.")]
    else:
        assert (job / "out.onnx").exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err == "onnxprune: terminated (SIGTERM); nothing written\n"
    assert "wrote" not in out
    assert snapshot(job) == before


# --- 3. the user's umask, fsync before the rename -----------------------------------------

@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_take_the_umask(job, umask, monkeypatch, mask):
    umask(mask)
    synced = []
    real_fsync, real_replace = outputs._fsync, outputs.os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        assert str(src) in synced, "renamed before fsync"
        real_replace(src, dst)

    monkeypatch.setattr(outputs, "_fsync", fsync)
    monkeypatch.setattr(outputs.os, "replace", replace)
    assert main([str(job / "model.onnx"), str(job / "out.onnx"), *PRUNE, "--report",
                 str(job / "r.json")]) == 0
    for name in ("out.onnx", "r.json"):
        assert (job / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert outputs.current_umask() == mask


def test_external_data_side_file_is_atomic_with_the_umask(job, umask, monkeypatch):
    umask(0o027)
    monkeypatch.setattr(modelio, "_EXTERNAL_DATA_LIMIT", 0)   # as if over 2 GiB
    monkeypatch.setattr(modelio, "_SIDE_FILE_THRESHOLD", 0)   # its small weights too
    assert main(["cut", str(job / "model.onnx"), str(job / "out.onnx"), *CUT]) == 0
    assert sorted(p.name for p in job.iterdir()) == ["model.onnx", "out.onnx",
                                                    "out.onnx.data"]
    for name in ("out.onnx", "out.onnx.data"):
        assert (job / name).stat().st_mode & 0o777 == 0o640
    model = onnx.load(str(job / "out.onnx"))   # the location points at the final name
    onnx.checker.check_model(model)


def test_current_umask_without_proc(monkeypatch, umask):
    umask(0o037)

    def no_proc(*args, **kwargs):
        raise OSError(errno.ENOENT, "no /proc")

    monkeypatch.setattr("builtins.open", no_proc)
    assert outputs.current_umask() == 0o037
    assert os.umask(0o037) == 0o037   # restored


# --- 4. full disk, read-only folder: one line, exit 2, nothing left -----------------------

def _partial_then_enospc(model, path, *args, **kwargs):
    Path(path).write_bytes(b"\x08\x07" * 1000)   # part of the file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("case", ["enospc_in_save", "enospc_at_fsync", "erofs", "eacces",
                                  "enospc_in_side_file"])
def test_write_errors_are_one_line_and_leave_nothing(job, capsys, monkeypatch, case):
    if case == "enospc_in_save":
        monkeypatch.setattr(modelio.onnx, "save_model", _partial_then_enospc)
    elif case == "enospc_at_fsync":
        fail_on_fsync(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    elif case in ("erofs", "eacces"):
        code = errno.EROFS if case == "erofs" else errno.EACCES

        def mkstemp(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)
    else:   # the side file is written, the model's fsync fails: neither is left
        monkeypatch.setattr(modelio, "_EXTERNAL_DATA_LIMIT", 0)
        monkeypatch.setattr(modelio, "_SIDE_FILE_THRESHOLD", 0)
        fail_on_fsync(monkeypatch, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    before = snapshot(job)
    assert main(["cut", str(job / "model.onnx"), str(job / "out.onnx"), *CUT]) == 2
    err = one_line_error(capsys)
    assert err.startswith("onnxprune: error: ") and "cannot write" in err
    assert snapshot(job) == before


def test_write_json_full_disk(tmp_path, monkeypatch):
    from onnxprune.report import write_json

    fail_on_fsync(monkeypatch, 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(outputs.OnnxpruneError, match="cannot write: No space"):
        write_json(str(tmp_path / "no.json"), {"a": 1})
    assert list(tmp_path.iterdir()) == []


# --- plots: the same atomic writer (``save_figure``; a stand-in for a matplotlib figure) ---

class FakeFigure:
    def __init__(self, fail: OSError | None = None) -> None:
        self.fail, self.saved = fail, []

    def savefig(self, path, dpi=None, format=None):
        Path(path).write_bytes(f"image/{format}".encode())   # what matplotlib would write
        self.saved.append(path)
        if self.fail:
            raise self.fail


@pytest.mark.parametrize("name,fmt", [("scores.png", "png"), ("scores.PDF", "pdf"),
                                      ("scores", "png")])
def test_plot_is_written_atomically_in_its_format(tmp_path, umask, name, fmt):
    umask(0o022)
    fig = FakeFigure()
    outputs.save_figure(fig, tmp_path / name)
    assert Path(fig.saved[0]).parent == tmp_path
    assert Path(fig.saved[0]).name.startswith(f".{name}.")
    assert (tmp_path / name).read_bytes() == f"image/{fmt}".encode()
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_plot_on_a_full_disk_leaves_nothing(tmp_path):
    fig = FakeFigure(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(outputs.OnnxpruneError, match="cannot write: No space"):
        outputs.save_figure(fig, tmp_path / "scores.png")
    assert list(tmp_path.iterdir()) == []


def test_both_plots_use_save_figure():
    import inspect

    from onnxprune import bench, report

    for function in (report.plot_scores, bench.plot_bench):
        assert "save_figure(fig, path)" in inspect.getsource(function)
