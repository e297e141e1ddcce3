"""The one error type the tools turn into a one-line message and a non-zero exit."""


class QuantizeError(Exception):
    """Bad input or settings; the message names what is at fault and what to do."""
