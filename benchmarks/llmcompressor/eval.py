# Perplexity of an llm-compressor checkpoint (dequantized to fp32) with aaac-eval's protocol, plus a check that
# every group of 64 holds at most 16 distinct values. Usage: python eval.py NAME MODEL_DIR -> eval_NAME.json
import json
import math
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def perplexity(model, tokenizer, text, seqlen=2048, max_tokens=32768):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:max_tokens]
    windows = len(ids) // seqlen
    nll, count = 0.0, 0
    for w in range(windows):
        batch = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        logits = model(input_ids=batch, use_cache=False).logits[0, :-1].float()
        nll += nn.functional.cross_entropy(logits, batch[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return math.exp(nll / count), count


name, mdir = sys.argv[1], sys.argv[2]
if os.environ.get("LLMC_THREADS"):
    torch.set_num_threads(int(os.environ["LLMC_THREADS"]))
print("torch threads", torch.get_num_threads(), flush=True)
TOKDIR = os.environ.get("AAAC_SOURCE", "artifacts/SmolLM2-135M-Instruct")
tok = AutoTokenizer.from_pretrained(TOKDIR)
kw = {}
cfg = json.load(open(os.path.join(mdir, "config.json")))
if "quantization_config" in cfg:
    from transformers import CompressedTensorsConfig

    kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    print("quantization_config in checkpoint:", json.dumps(cfg["quantization_config"])[:2000], flush=True)
model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, **kw)
model = model.to(torch.float32).eval()
print(type(model), {p.dtype for p in model.parameters()}, flush=True)

# --- verification of quantized weights (distinct values per group of 64) ---
check = {}
W = model.model.layers[0].mlp.down_proj.weight.detach().float()
g = W.reshape(W.shape[0], -1, 64)
nd = torch.tensor([[len(torch.unique(g[r, j])) for j in range(g.shape[1])] for r in range(g.shape[0])])
check["layer0.mlp.down_proj"] = {
    "shape": list(W.shape),
    "max_distinct_per_group64": int(nd.max()),
    "min_distinct": int(nd.min()),
    "mean_distinct": float(nd.float().mean()),
}
# all decoder linears: max distinct per group
mx = 0
for _, m in model.model.layers.named_modules():
    if isinstance(m, nn.Linear):
        Wm = m.weight.detach().float()
        gg = Wm.reshape(Wm.shape[0], -1, 64)
        s, _ = gg.sort(dim=-1)
        d = 1 + (s[..., 1:] != s[..., :-1]).sum(-1)
        mx = max(mx, int(d.max()))
check["all_decoder_linears_max_distinct_per_group64"] = mx
check["lm_head_tied_to_embed"] = bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
check["embed_distinct_first_group_row0"] = int(len(torch.unique(model.model.embed_tokens.weight[0, :64])))
print("CHECK", json.dumps(check), flush=True)

torch.manual_seed(0)
res = {"check": check}
for key, path in [
    ("bbc", "artifacts/text/bbc-eval.txt"),
    ("pydoc", os.environ.get("AAAC_PYDOC", "artifacts/text/pydoc-topics.txt")),
]:
    text = open(path, encoding="utf-8").read()
    t0 = time.time()
    ppl, n = perplexity(model, tok, text)
    print(f"PPL {name} {key} {ppl:.4f} over {n} tokens ({time.time() - t0:.0f}s)", flush=True)
    res[key] = ppl
    res[key + "_tokens"] = n
json.dump(res, open(f"eval_{name}.json", "w"), indent=1)
