"""Reference models (torch) for onnxprune's tests, demos and benchmarks.

These are not part of the installed package: the training scripts in ``tools/``
import them from the repository root.
"""
