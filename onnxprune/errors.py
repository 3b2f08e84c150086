"""The one exception type the tool raises for bad input; the CLI prints it as one line."""


class OnnxpruneError(Exception):
    """A user-facing error: bad file, bad unit name, unsupported model, failed check.

    ``exit_code`` is what the CLI exits with (2 for bad input, see README).
    """

    exit_code = 2


class NotPrunableError(OnnxpruneError):
    """The model (or the requested unit) cannot be pruned safely; the message says why."""


class VerificationError(OnnxpruneError):
    """A rewritten model failed the exactness contract or ONNX checks; nothing is written."""

    exit_code = 4
