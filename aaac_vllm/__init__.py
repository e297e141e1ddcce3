"""vLLM integration for AAAC checkpoints (the `aaac` quantization method).

The plugin (AAACConfig, AAACLinearMethod) is built in the vLLM-backend issue;
until then an AAAC checkpoint runs through the reference dequantizer:
``offline_quantize.hf_loader.load_causal_lm``.
"""
