"""The quantization methods, one module each; importing this package registers them all.

The import order below is the order of the CLI's choices, aaac-compare's runs and docs/method.md's table.
Adding a method is one new module here (docs/method.md, "Adding a method").
"""

from . import aaac, awq, gptq, nf4, rtn, rtn_sym  # noqa: F401  (registration)
from .registry import METHODS, LayerOptions, Method, MethodOptions, QuantizedLinear, compared_variants

__all__ = ["METHODS", "LayerOptions", "Method", "MethodOptions", "QuantizedLinear", "compared_variants"]
