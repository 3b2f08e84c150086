"""onnxprune: structured pruning of attention and FFN blocks in ONNX files."""

__version__ = "0.1.0"
