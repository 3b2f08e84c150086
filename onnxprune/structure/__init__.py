"""Finding prunable structure in an ONNX graph: coupled axes, blocks, costs."""
