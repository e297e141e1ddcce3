"""A roofline for the decode GEMV: instruction counts from its SASS and a measured GPU run turned into
the time each layer needs, and projected to an H100 (no GPU needed).

    python benchmarks/roofline.py [benchmarks/results/h200-kernels.json]

Per layer and each M of the run that the GEMV serves (M <= 4), two floors:
  memory  the layer's AAAC bytes at the rate cuBLAS read the same layer's bf16 weights at M = 1 in the
          run (the practical read rate of that shape on that GPU);
  issue   weights x warp instructions per weight of the GEMV's main loop (benchmarks/kernel_resources.py,
          sm_90, bf16, g128) / (SMs x 4 schedulers x clock).
The model is max(memory, issue / e), where e, the fraction of issue slots the loop gets, is fitted per M
as the median over the layers of issue / measured time. It prints the measured and modelled speed-ups
over bf16 on the measured GPU, and the projection for an H100 SXM: the same SMs and clock, so the
issue floor is unchanged, and 3.35 instead of 4.8 TB/s of HBM, which scales bf16's time and the memory
floor. Projections are predictions until an H100 measures them.
"""

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_resources import gemv_rows  # noqa: E402

GPUS = {"H200": {"sms": 132, "clock": 1.98e9, "hbm": 4.8e12}, "H100": {"sms": 132, "clock": 1.98e9, "hbm": 3.35e12}}


def gemv_instructions_per_weight() -> dict[int, float]:
    """M -> warp instructions per weight of the GEMV's main loop (sm_90, bf16, group size 128)."""
    rows = gemv_rows(90, dtypes=("bf16",), group_sizes=(128,))
    return {int(name.split("=")[1]): loop["instructions_per_weight"] for name, _, _, _, _, loop in rows}


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results" / "h200-kernels.json"
    rows = json.loads(path.read_text())["rows"]
    measured_m = {r["m"] for r in rows}
    per_weight = {m: count for m, count in gemv_instructions_per_weight().items() if m in measured_m}
    measured, projected = GPUS["H200"], GPUS["H100"]
    issue_rate = measured["sms"] * 4 * measured["clock"]
    bf16_rate = {r["layer"]: 2 * r["n"] * r["k"] / r["bf16"] for r in rows if r["m"] == 1}
    decode = [r for r in rows if r["m"] in per_weight]
    for r in decode:
        r["issue"] = r["n"] * r["k"] * per_weight[r["m"]] / issue_rate
        r["memory"] = r["weight_bytes"] / bf16_rate[r["layer"]]
    efficiency = {m: statistics.median(r["issue"] / r["aaac"] for r in decode if r["m"] == m) for m in per_weight}
    slower_hbm = measured["hbm"] / projected["hbm"]
    print(f"{path.name}; GEMV main loop, warp instructions per weight by M: {per_weight}")
    print(f"issue efficiency e fitted per M: { {m: round(e, 2) for m, e in efficiency.items()} }")
    print(
        "| layer | M | issue floor µs | memory floor µs | measured µs | measured / model x | H200 speed-up: "
        "measured, model | H100 speed-up: projected |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in decode:
        model = max(r["issue"] / efficiency[r["m"]], r["memory"])
        h100 = max(r["issue"] / efficiency[r["m"]], r["memory"] * slower_hbm)
        print(
            f"| {r['layer']} | {r['m']} | {r['issue'] * 1e6:.1f} | {r['memory'] * 1e6:.1f} | {r['aaac'] * 1e6:.1f} "
            f"| {r['aaac'] / model:.2f} | {r['bf16'] / r['aaac']:.2f}x, {r['bf16'] / model:.2f}x "
            f"| {r['bf16'] * slower_hbm / h100:.2f}x |"
        )
    print("\n| M | H200 measured (geometric mean) | H100 projected | issue floor alone, H200 |")
    print("|---:|---:|---:|---:|")
    for m in per_weight:
        at_m = [r for r in decode if r["m"] == m]
        gmean = lambda values: statistics.geometric_mean(values)  # noqa: E731
        h100 = [r["bf16"] * slower_hbm / max(r["issue"] / efficiency[m], r["memory"] * slower_hbm) for r in at_m]
        print(
            f"| {m} | {gmean([r['bf16'] / r['aaac'] for r in at_m]):.2f}x | {gmean(h100):.2f}x "
            f"| {gmean([r['bf16'] / max(r['issue'], r['memory']) for r in at_m]):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
