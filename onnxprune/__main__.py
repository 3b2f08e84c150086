"""``python -m onnxprune``: the same command line as ``onnxprune``."""

import sys

from onnxprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
