"""The command line as a CI pipeline sees it: --version, python -m onnxprune, and one
machine-readable convention for every command (--json [FILE|-])."""

from __future__ import annotations

import subprocess
import sys

import onnx
import onnxruntime

import onnxprune
from onnxprune.cli import main


def test_version_is_the_package_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"onnxprune {onnxprune.__version__} ")
    assert onnx.__version__ in out and onnxruntime.__version__ in out


def test_python_dash_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "onnxprune", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith(f"onnxprune {onnxprune.__version__}")


def test_the_installed_metadata_reads_the_same_version():
    from importlib.metadata import version

    assert version("onnxprune") == onnxprune.__version__
