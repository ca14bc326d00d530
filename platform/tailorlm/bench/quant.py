"""Quantized against bf16 on a model large enough to be memory-bound on CPU: decode tokens/s in
vLLM and the perplexity change, per scheme.

    python -m tailorlm.bench.quant                         # ~0.5B random-init Llama, w8a8 and w4a16
    python -m tailorlm.bench.quant --method gptq --schemes w4a16

The model (28 layers, hidden 1280, GQA 20/4 heads, about 0.48B parameters) is built from a config
with the project's locally trained tokenizer and cached like the tiny one; quantized copies come
from the export stage's own `quantize`. Each variant is timed in a fresh vLLM process (CPU
backend): decode tokens/s = 128 tokens / (time for 136 generated tokens - time for 8), so prompt
processing and start-up cancel out; at batch 1 (memory-bound) and batch 8. Perplexity is the
export stage's `compare_variants` on generated domain text. A random-init model's perplexity is
high in absolute terms; what the benchmark reads is the change each scheme causes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = {
    "hidden_size": 1280,
    "num_layers": 28,
    "num_heads": 20,
    "num_kv_heads": 4,
    "intermediate_size": 3456,
    "max_position_embeddings": 1024,
    "seed": 0,
}


def time_decode(model_dir: str, batch: int, reps: int) -> dict:
    """In this process: median decode tokens/s of one vLLM engine over reps runs."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, max_model_len=512, dtype="bfloat16", gpu_memory_utilization=0.3, seed=0)
    prompts = [{"prompt_token_ids": [100 + i + 7 * j for j in range(32)]} for i in range(batch)]

    def run(n: int) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0)
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t

    run(8)  # warm-up
    rates = sorted(batch * 128 / max(1e-6, run(136) - run(8)) for _ in range(reps))
    return {"batch": batch, "decode_tok_s": rates[len(rates) // 2]}


def decode_in_subprocess(model_dir: str, batch: int, reps: int) -> dict:
    """One fresh process per measurement: engines never share memory or threads."""
    code = (
        f"import json; from tailorlm.bench.quant import time_decode; "
        f"print('RESULT', json.dumps(time_decode({model_dir!r}, {batch}, {reps})))"
    )
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: vLLM's output would fill a pipe and block
        proc = subprocess.run(
            [sys.executable, "-c", code],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")},
        )
        log.seek(0)
        out = log.read()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"decode timing failed for {model_dir}:\n{out[-3000:]}")
    return json.loads(lines[-1][7:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w4a16"])
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval-docs", type=int, default=24, help="domain documents perplexity is measured on")
    ap.add_argument("--work", help="folder for the quantized copies (default: a temporary one)")
    args = ap.parse_args(argv)

    from tailorlm.config import TinyModelSpec
    from tailorlm.demo_data import corpus_texts
    from tailorlm.export.quantize import quantize, weights_size
    from tailorlm.export.stage import compare_variants
    from tailorlm.models import ensure_tiny_model

    t = time.time()
    base = str(ensure_tiny_model(TinyModelSpec(**SPEC)))
    print(f"model {base} ready in {time.time() - t:.0f}s")
    texts = corpus_texts()
    work = Path(args.work or tempfile.mkdtemp(prefix="tailorlm-quant-"))
    variants = {}
    for scheme in args.schemes:
        t = time.time()
        calib = texts[-64:] if args.method == "gptq" else None
        variants[scheme] = quantize(base, str(work / scheme), scheme, args.method, calib_texts=calib, calib_len=256)
        print(f"{scheme}: quantized ({args.method}) in {time.time() - t:.0f}s")
    quality = compare_variants(base, variants, [{"text": x} for x in texts[: args.eval_docs]], max_len=256, n_prompts=0)
    rows = []
    for name, path in {"bf16": base, **variants}.items():
        speed = {b: decode_in_subprocess(path, b, args.reps)["decode_tok_s"] for b in args.batches}
        rows.append(
            {"variant": name, "size_mb": weights_size(path) / 2**20, "ppl": quality[name]["perplexity"], "speed": speed}
        )
        print(f"{name}: {speed}")
    ref = rows[0]
    print(
        f"\n{'variant':>8} {'weights MB':>10} {'perplexity':>11} {'ppl change':>10} "
        + " ".join(f"{f'tok/s b={b}':>11} {'x bf16':>6}" for b in args.batches)
    )
    for r in rows:
        cols = " ".join(f"{r['speed'][b]:11.1f} {r['speed'][b] / ref['speed'][b]:6.2f}" for b in args.batches)
        print(f"{r['variant']:>8} {r['size_mb']:10.0f} {r['ppl']:11.2f} {r['ppl'] / ref['ppl'] - 1:+10.2%} {cols}")
    print("baseline: bf16, same model, same vLLM CPU engine settings, same process layout")


if __name__ == "__main__":
    main()
