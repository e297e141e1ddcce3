"""The quantization methods, one module each. Importing this package imports every module in it, and so
registers every method (in the order of their module names: the CLI's choices, aaac-compare's runs and
docs/method.md's table follow it). Adding a method is one new module here (docs/method.md, "Adding a method").
"""

import importlib
import pkgutil

from .registry import METHODS, LayerOptions, Method, MethodOptions, QuantizedLinear, compared_variants

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "LayerOptions", "Method", "MethodOptions", "QuantizedLinear", "compared_variants"]
