"""vLLM integration for AAAC checkpoints: the ``aaac`` quantization method.

vLLM calls ``register`` in every process through the ``vllm.general_plugins``
entry point, so installing the package is all a user does. Importing this
package alone does not import vLLM.
"""


def register() -> None:
    """Register ``AAACConfig`` under the name ``aaac`` (registration happens at import of the module)."""
    from . import config  # noqa: F401
