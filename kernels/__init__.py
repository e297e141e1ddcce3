"""AAAC kernels, installed as ``aaac_kernels``.

``format`` holds the checkpoint layout (the one place that knows how indices and
codebook choices are stored); ``reference`` holds the dequantizer that every
other path is tested against; ``linear`` the load-time layout and the torch
custom op ``aaac::linear`` (plain torch on CPU); ``triton_gemm`` the Triton
kernels the op runs on CUDA. docs/kernels.md describes them.
"""
