"""onnxprune: structured pruning of attention and FFN blocks in ONNX files.

``bench``, ``evaluate`` and ``finetune`` are modules that can be called:
``onnxprune.bench(models)`` runs the benchmark and ``onnxprune.bench.BenchRow`` is its row
type (see :mod:`onnxprune.callable_module`).
"""

from onnxprune import bench, evaluate, finetune
from onnxprune.api import (
    CutResult,
    cut,
    gate,
    inspect,
    measure,
    prune,
    prune_while_finetuning,
    score,
)
from onnxprune.errors import NotPrunableError, OnnxpruneError, VerificationError

__version__ = "0.1.0"
__all__ = ["CutResult", "NotPrunableError", "OnnxpruneError", "VerificationError", "bench",
           "cut", "evaluate", "finetune", "gate", "inspect", "measure", "prune",
           "prune_while_finetuning", "score"]
