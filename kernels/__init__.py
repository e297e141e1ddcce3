"""AAAC kernels, installed as ``aaac_kernels``.

``format`` holds the packed layout (the one place that knows how indices and
codebook choices are stored); ``reference`` holds the dequantizer that every
other path is tested against.
"""
