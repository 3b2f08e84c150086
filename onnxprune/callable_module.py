"""Modules that can be called: ``onnxprune.bench(...)`` runs the benchmark while
``onnxprune.bench.BenchRow`` and ``import onnxprune.bench`` still reach the module.

A package attribute can be either the submodule ``bench`` or a function ``bench``, not
both: a function bound in ``__init__`` hides the module from ``import onnxprune.bench as
b`` (Python then hands back the package attribute), and importing the module later rebinds
the attribute to it. Making the module itself callable keeps one object under that name.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable


def make_callable(module_name: str, function: Callable) -> None:
    """Calling the module ``module_name`` calls ``function`` (its main entry point)."""
    kind = type("CallableModule", (types.ModuleType,), {"__call__": staticmethod(function)})
    sys.modules[module_name].__class__ = kind
