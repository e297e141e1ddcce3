"""The AAAC format: everything a checkpoint is, in one place (docs/format.md describes it).

Data flows through its modules in this order:

* ``layout``     constants, index packing, sign-bit scale encoding (format version 1);
* ``reference``  the reference dequantizer, the one definition of what a layer means;
* ``config``     the ``quantization_config`` schema of config.json and its validation;
* ``files``      safetensors shards, their index and side files: reading and writing;
* ``manifest``   sizes and SHA-256 sums of the tensor files;
* ``verify``     every check a loader makes before it allocates anything;
* ``experts``    how mixture-of-experts layers are stored: one linear per expert and part;
* ``serving``    the layouts the kernels read, made at load time from a checkpoint's tensors;
* ``awq``        the AutoAWQ format the uniform-grid baselines are written in;
* ``errors``     ``AAACError``, the one error type for bad input.

The quantizer writes through it; the vLLM backend, the kernels and ``aaac-eval`` read through it. It
imports neither the quantizer nor the vLLM backend (tests/test_architecture.py guards this).
"""
