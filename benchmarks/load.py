"""Load test of an OpenAI-compatible vLLM server: many concurrent clients, every answer checked.

    python benchmarks/load.py --url http://127.0.0.1:8000 --model NAME --text held-out.txt \\
        [--requests 256] [--concurrency 32] [--distinct 16] [--json]

The requests cycle through ``--distinct`` prompts (first lines of the text's paragraphs) with mixed
output lengths, half of them streamed. Each distinct request is first sent alone; then all of them are
sent from ``--concurrency`` client threads at once. A request fails if it errors, times out, or its
greedy tokens differ from the ones it got alone, except at a near tie: batched and solo runs multiply
by the same weights in different batch shapes, so float sums can round differently, and where the
solo run's two best tokens are within ``--tie`` in log-probability the batched run may take the other
one (and continue from there). Such requests are counted apart. Prints the counts and latency
percentiles; exits 1 if any request failed.
"""

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

MAX_TOKENS = (8, 16, 32, 48)
TOP = 5  # alternatives per step asked for, to judge near ties


@dataclass
class Answer:
    text: str
    tokens: list[str]
    top: list[dict[str, float]]  # per step: the TOP best tokens and their log-probabilities


@dataclass(frozen=True)
class Request:
    prompt: str
    max_tokens: int
    stream: bool


def plan(text: Path, distinct: int, total: int) -> list[Request]:
    paragraphs = [p.strip().splitlines()[0] for p in text.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if len(paragraphs) < distinct:
        raise SystemExit(f"{text}: {len(paragraphs)} paragraphs, fewer than --distinct {distinct}")
    prompts = paragraphs[:distinct]
    return [
        Request(prompts[i % distinct], MAX_TOKENS[i % len(MAX_TOKENS)], stream=(i // distinct) % 2 == 1)
        for i in range(total)
    ]


def complete(client: OpenAI, model: str, request: Request) -> Answer:
    kwargs = dict(model=model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=0, logprobs=TOP)
    if not request.stream:
        choice = client.completions.create(**kwargs).choices[0]
        return Answer(choice.text, choice.logprobs.tokens, choice.logprobs.top_logprobs)
    answer = Answer("", [], [])
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.choices:
            choice = chunk.choices[0]
            answer.text += choice.text
            if choice.logprobs:
                answer.tokens += choice.logprobs.tokens
                answer.top += choice.logprobs.top_logprobs
    return answer


def judge(got: Answer, alone: Answer, tie: float) -> str | None:
    """None if ``got`` equals the solo answer; "near tie" if it first parts from it where the solo run's
    choice and ``got``'s were within ``tie``; else what differs."""
    if got.tokens == alone.tokens:
        return None
    step = next(
        (i for i, (a, b) in enumerate(zip(got.tokens, alone.tokens)) if a != b), min(len(got.tokens), len(alone.tokens))
    )
    where = ""
    if step < min(len(got.tokens), len(alone.tokens)):
        best, ours, theirs = alone.top[step], got.tokens[step], alone.tokens[step]
        if {ours, theirs} <= best.keys():
            if best[theirs] - best[ours] <= tie:
                return "near tie"
            where = f" (solo log-probabilities there: {theirs!r} {best[theirs]:.3f}, {ours!r} {best[ours]:.3f})"
    return f"differs from the solo answer at token {step}{where}: {got.text!r} against {alone.text!r}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(url: str, model: str, requests: list[Request], concurrency: int, timeout: float, tie: float) -> dict:
    client = OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="unused", timeout=timeout, max_retries=0)
    alone = {}
    for request in requests:
        key = (request.prompt, request.max_tokens)
        if key not in alone:
            alone[key] = complete(client, model, Request(request.prompt, request.max_tokens, stream=False))

    def one(request: Request) -> tuple[float, str | None]:
        start = time.perf_counter()
        try:
            answer = complete(client, model, request)
        except Exception as exc:  # a load test counts failures instead of stopping at the first
            return time.perf_counter() - start, f"error: {type(exc).__name__}: {exc}"
        return time.perf_counter() - start, judge(answer, alone[(request.prompt, request.max_tokens)], tie)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, requests))
    seconds = time.perf_counter() - start
    latencies = [latency for latency, _ in results]
    outcomes = [problem for _, problem in results if problem]
    errors = [p for p in outcomes if p.startswith("error")]
    mismatches = [p for p in outcomes if p.startswith("differs")]
    return {
        "requests": len(requests),
        "concurrency": concurrency,
        "completed": len(requests) - len(errors),
        "errors": len(errors),
        "mismatches": len(mismatches),
        "near_ties": outcomes.count("near tie"),
        "identical": len(requests) - len(outcomes),
        "seconds": seconds,
        "requests_per_s": len(requests) / seconds,
        "latency_s": {
            q: percentile(latencies, v) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "first_failures": (errors + mismatches)[:3],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the served model name")
    parser.add_argument("--text", type=Path, required=True, help="text whose paragraphs' first lines become prompts")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--distinct", type=int, default=16, help="distinct prompts the requests cycle through")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    # bf16 logits of magnitude 32-64 (SmolLM2's) are spaced 0.25 apart: one bf16 step between two tokens is a tie.
    parser.add_argument(
        "--tie",
        type=float,
        default=0.3,
        help="log-probability gap up to which a batched run may take the solo run's runner-up (default 0.3)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    result = run(
        args.url, args.model, plan(args.text, args.distinct, args.requests), args.concurrency, args.timeout, args.tie
    )
    if args.json:
        print(json.dumps(result))
    else:
        lat = result["latency_s"]
        print(
            f"{result['requests']} requests from {result['concurrency']} clients in {result['seconds']:.1f} s "
            f"({result['requests_per_s']:.2f} requests/s): {result['completed']} completed, {result['errors']} errors; "
            f"{result['identical']} identical to the solo answers, {result['near_ties']} parted at a near tie, "
            f"{result['mismatches']} differ"
        )
        print(f"latency p50 {lat['p50']:.2f} s, p90 {lat['p90']:.2f} s, p99 {lat['p99']:.2f} s, max {lat['max']:.2f} s")
        for problem in result["first_failures"]:
            print(f"  {problem}")
    return 1 if result["errors"] or result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
