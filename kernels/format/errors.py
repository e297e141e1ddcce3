"""The one error type for bad input (a checkpoint, settings, a file): the CLIs turn it into a one-line
message, vLLM shows it at load."""


class AAACError(ValueError):
    """Bad input, settings or checkpoint; the message names what is at fault and what to do."""
