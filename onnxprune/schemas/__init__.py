"""JSON Schemas of what onnxprune writes, shipped as package data.

``prune_report.schema.json``: the prune report (``onnxprune prune ... --json``/``--report``),
``schema_version`` 1.
"""

from __future__ import annotations

import json
from importlib import resources


def load(name: str = "prune_report") -> dict:
    """The schema ``<name>.schema.json`` as a dict."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.schema.json").read_text())
