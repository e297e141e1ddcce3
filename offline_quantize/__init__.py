"""Offline AAAC quantizer: Hugging Face causal LM -> AAAC-packed safetensors checkpoint."""

__version__ = "0.1.0"
