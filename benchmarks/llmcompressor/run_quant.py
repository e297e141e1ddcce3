# llm-compressor's GPTQ or AWQ (W4A16, asymmetric, group 64) on our calibration windows: the outside check of
# docs/results.md. Runs in its own venv (see README.md here). Usage: python run_quant.py {gptq|awq} OUTDIR [bf16|fp32]
import json
import os
import resource
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer

method, outdir = sys.argv[1], sys.argv[2]
dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[3] if len(sys.argv) > 3 else "bf16"]
MODEL = os.environ.get("AAAC_SOURCE", "artifacts/SmolLM2-135M-Instruct")
if os.environ.get("LLMC_THREADS"):
    torch.set_num_threads(int(os.environ["LLMC_THREADS"]))
print("torch threads", torch.get_num_threads(), "dtype", dtype, flush=True)

model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype)
tok = AutoTokenizer.from_pretrained(MODEL)
ids = torch.load(os.environ.get("AAAC_CALIB_IDS", "calib_ids.pt"))
assert ids.shape == (128, 512) and ids.dtype == torch.int64
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

scheme = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64},
        "input_activations": None,
        "output_activations": None,
    }
}
if method == "gptq":
    from llmcompressor.modifiers.gptq import GPTQModifier

    recipe = [GPTQModifier(config_groups=scheme, ignore=["lm_head"], actorder=None)]
elif method == "awq":
    # WORKAROUND (llmcompressor 0.14.0.1 bug on CPU-only machines): AWQ calls
    # IntermediatesCache.pin_memory(), and tensor.pin_memory() raises
    # "Cannot access accelerator device when none is available". Pinning is only a
    # host->device transfer optimisation, so make it a no-op when no accelerator exists.
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None
        print("PATCH: IntermediatesCache.pin_memory -> no-op (no accelerator)", flush=True)
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    recipe = [AWQModifier(), QuantizationModifier(config_groups=scheme, ignore=["lm_head"])]
else:
    raise SystemExit("bad method")
print(recipe, flush=True)

t0 = time.time()
oneshot(
    model=model,
    dataset=ds,
    recipe=recipe,
    num_calibration_samples=128,
    max_seq_length=512,
    shuffle_calibration_samples=False,
)
secs = time.time() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"ONESHOT_SECONDS {secs:.1f}  PEAK_RSS_MIB {rss:.1f}", flush=True)
# record resolved settings
settings = {}
for m in recipe:
    settings[type(m).__name__] = {
        k: (str(v) if not isinstance(v, (int, float, bool, type(None))) else v)
        for k, v in m.model_dump().items()
        if k
        in (
            "block_size",
            "dampening_frac",
            "actorder",
            "duo_scaling",
            "n_grid",
            "mappings",
            "offload_device",
            "ignore",
            "targets",
        )
    }
qs = model.model.layers[0].mlp.down_proj.quantization_scheme
settings["resolved_scheme_layer0_down_proj"] = qs.model_dump(mode="json")
print(json.dumps(settings, indent=1, default=str), flush=True)
model.save_pretrained(outdir, save_compressed=True)
tok.save_pretrained(outdir)
json.dump(
    {"seconds": secs, "peak_rss_mib_after_oneshot": rss, "settings": settings},
    open(os.path.join(outdir, "run_info.json"), "w"),
    indent=1,
    default=str,
)
rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"PEAK_RSS_MIB_AFTER_SAVE {rss2:.1f}", flush=True)
