"""The quantization methods, one module each; importing this package registers them all.

The import order below is the order of the CLI's choices, aaac-compare's runs and docs/method.md's table.
Adding a method is one new module here (docs/method.md, "Adding a method").
"""

# The order of registration is the order users see: keep it, not the alphabet's.
# isort: off
from . import rtn, rtn_sym, nf4, gptq, awq, aaac  # noqa: F401
# isort: on

from .registry import METHODS, LayerOptions, Method, MethodOptions, QuantizedLinear, compared_variants

__all__ = ["METHODS", "LayerOptions", "Method", "MethodOptions", "QuantizedLinear", "compared_variants"]
