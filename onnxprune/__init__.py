"""onnxprune: structured pruning of attention and FFN blocks in ONNX files."""

from onnxprune.api import CutResult, cut, gate, inspect, measure, prune, score
from onnxprune.errors import NotPrunableError, OnnxpruneError, VerificationError

__version__ = "0.1.0"
__all__ = ["CutResult", "NotPrunableError", "OnnxpruneError", "VerificationError", "cut",
           "gate", "inspect", "measure", "prune", "score"]
