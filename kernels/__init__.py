"""AAAC kernels and format, installed as ``aaac_kernels`` (the folder is ``kernels/``: a top-level
package named ``kernels`` would shadow the PyPI package of that name that transformers imports).

``format`` is everything an AAAC checkpoint is (layout, reference dequantizer, config schema, files,
manifest, checks, serving layouts); both the quantizer and the vLLM backend stand on it and it
imports neither. ``linear`` is the torch custom op ``aaac::linear``; ``cpu`` its CPU side (the C++
kernels of ``csrc/`` and a plain-torch path); ``triton_gemm`` its CUDA kernels. docs/kernels.md
describes them. ``experts`` runs a mixture-of-experts layer as one linear per expert and part;
``routed_experts`` is the op vLLM runs for such a layer (the same loop on CPU, the grouped Triton kernels
of ``triton_experts`` on CUDA), and ``hf`` loads AAAC checkpoints in transformers.
"""
