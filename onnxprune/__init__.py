"""onnxprune: structured pruning of attention and FFN blocks in ONNX files."""

# the submodules bench, evaluate and finetune are loaded first, so that the functions of the
# same names below stay bound to the package however the modules are imported later
import onnxprune.bench
import onnxprune.evaluate
import onnxprune.finetune  # noqa: F401
from onnxprune.api import (
    CutResult,
    bench,
    cut,
    evaluate,
    finetune,
    gate,
    inspect,
    measure,
    prune,
    score,
)
from onnxprune.errors import NotPrunableError, OnnxpruneError, VerificationError

__version__ = "0.1.0"
__all__ = ["CutResult", "NotPrunableError", "OnnxpruneError", "VerificationError", "bench",
           "cut", "evaluate", "finetune", "gate", "inspect", "measure", "prune", "score"]
