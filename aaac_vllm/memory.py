"""Weight memory of a model loaded in a vLLM worker, split into linear layers and the rest."""

import torch


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{"linear": bytes held by linear layers and mixture-of-experts layers' experts (quantized or not),
    "other": embeddings, norms, buffers}.

    Run it in the worker: ``LLM.apply_model(weight_bytes)`` (vLLM needs
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 to send a function to its workers).
    Tied tensors are counted once.
    """
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    layers = (LinearBase, RoutedExperts)
    linear_modules = {name for name, module in model.named_modules() if isinstance(module, layers)}
    totals = {"linear": 0, "other": 0}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, LinearBase) and isinstance(weight, torch.Tensor) and weight.numel() == 0:
            # vLLM's CPU build moves dense weights into oneDNN handles, leaving an empty tensor: count by shape.
            k = getattr(module, "input_size_per_partition", module.input_size)
            n = getattr(module, "output_size_per_partition", module.output_size)
            totals["linear"] += k * n * module.params_dtype.itemsize
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.numel() == 0 or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        kind = "linear" if name.rpartition(".")[0] in linear_modules else "other"
        totals[kind] += tensor.numel() * tensor.element_size()
    return totals
