"""Test set-up: tests/ on sys.path (forms.py, hf_forms.py), --runslow, exported-model cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory):
    """Export each (form, dynamo, dynamic_batch) once per session; returns a getter."""
    from forms import export_form

    folder = tmp_path_factory.mktemp("forms")
    cache: dict[tuple, dict] = {}

    def get(name: str, dynamo: bool, dynamic_batch: bool) -> dict:
        key = (name, dynamo, dynamic_batch)
        if key not in cache:
            path = folder / f"{name}_{int(dynamo)}{int(dynamic_batch)}.onnx"
            cache[key] = export_form(name, str(path), dynamo=dynamo, dynamic_batch=dynamic_batch)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def reference_model() -> Path:
    return ROOT / "models" / "patchtst_etth1.onnx"


@pytest.fixture(autouse=True)
def _reports_follow_the_schema(monkeypatch):
    """Every prune report a test makes through the CLI is validated against the shipped
    JSON Schema (onnxprune/schemas/prune_report.schema.json) as it is made."""
    try:
        import jsonschema
    except ImportError:   # the core-only fast lane: tests/fast/test_cli_json.py says so
        yield
        return
    import onnxprune.cli
    from onnxprune import schemas

    validator = jsonschema.Draft202012Validator(schemas.load("prune_report"))
    made = onnxprune.cli.prune_report_json

    def checked(*args, **kwargs):
        report = made(*args, **kwargs)
        validator.validate(report)
        return report

    monkeypatch.setattr(onnxprune.cli, "prune_report_json", checked)
    yield
