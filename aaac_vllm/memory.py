"""Weight memory of a model loaded in a vLLM worker, split into linear layers and the rest."""

import torch


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{"linear": bytes held by linear layers (quantized or not), "other": embeddings, norms, buffers}.

    Run it in the worker: ``LLM.apply_model(weight_bytes)`` (vLLM needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 to send a function to its workers).
    Tied tensors are counted once.
    """
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    linear_modules = {name for name, module in model.named_modules() if isinstance(module, LinearBase)}
    totals = {"linear": 0, "other": 0}
    dense = set()
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and isinstance(module.quant_method, UnquantizedLinearMethod):
            # vLLM's CPU build moves dense weights into oneDNN handles that are not parameters: count them by shape.
            dense.add(f"{name}.weight")
            totals["linear"] += (
                module.input_size_per_partition * module.output_size_per_partition * module.params_dtype.itemsize
            )
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in dense or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        kind = "linear" if name.rpartition(".")[0] in linear_modules else "other"
        totals[kind] += tensor.numel() * tensor.element_size()
    return totals
