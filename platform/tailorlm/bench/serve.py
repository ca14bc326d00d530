"""Serving overhead: our endpoint (Ray Serve + vLLM + Guard) against bare `vllm serve`.

    python -m tailorlm.bench.serve                          # the tiny factory model, backend vllm
    python -m tailorlm.bench.serve --backends vllm ray_llm  # both serving backends
    python -m tailorlm.bench.serve --backends vllm vllm+capture  # what serve.capture costs (on / off)
    python -m tailorlm.bench.serve --run-dir runs/demo      # the demo's newest bf16 export; saves
                                                            # runs/demo/bench/serve.json for the report

Both servers host the same model folder with the same engine flags (serving.engine.vllm_argv),
one after the other on this machine, and vLLM's own `vllm bench serve` (random dataset, fixed input and output lengths,
ignore_eos) drives each at every --concurrency. Prints output tokens/s (ratio ours / bare, target
>= 0.95) and median time to first token (difference, target <= 10 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MODEL_ID = "demo"


def bench_config(args, backend: str = "vllm"):
    """backend: a serve.backend, or vllm+capture (serve.capture on, every request recorded, into a
    temporary run folder)."""
    from tailorlm.config import load_config

    backend, _, extra = backend.partition("+")
    capture = ["serve.capture.enabled=true", f"run.storage={tempfile.mkdtemp(prefix='capture-')}"]
    return load_config(
        None,
        [
            f"serve.port={args.port}",
            f"serve.model_id={MODEL_ID}",
            f"serve.backend={backend}",
            "serve.engine.max_model_len=1024",
            "serve.engine.memory_utilization=0.15",
            "serve.guard.rate_limit_per_minute=1000000",
            "serve.guard.tokens_per_minute=1000000000",
            f"serve.guard.max_tokens_cap={args.output_len}",
            f"serve.engine.args={{stream-interval: {args.stream_interval}}}",
            *([f"serve.stream_batching_ms={args.stream_batching_ms}"] if args.stream_batching_ms is not None else []),
            *(capture if extra == "capture" else []),
        ],
    )


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 600) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s")


def vllm_bench(port: int, model_dir: str, concurrency: int, args, out_dir: Path) -> dict:
    """One `vllm bench serve` run against http://127.0.0.1:port; returns its saved result JSON."""
    name = f"{port}-c{concurrency}.json"
    cmd = [
        sys.executable,
        "-m",
        "tailorlm.bench.vllm_cli",
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--endpoint",
        "/v1/completions",
        "--model",
        MODEL_ID,
        "--tokenizer",
        model_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--num-prompts",
        str(args.prompts_per_slot * concurrency),
        "--max-concurrency",
        str(concurrency),
        "--num-warmups",
        str(concurrency),
        "--seed",
        "0",
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        name,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    out = json.loads((out_dir / name).read_text())
    if out.get("failed"):
        raise RuntimeError(f"{out['failed']} requests failed against port {port}")
    return {k: out[k] for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms", "completed")}


@contextlib.contextmanager
def bare_server(model_dir: str, args, out_dir: Path):
    """`vllm serve` with the flags our backend gives its engine; yields its port."""
    from tailorlm.serving.engine import vllm_argv

    port = args.port + 1
    flags = vllm_argv(bench_config(args).serve, MODEL_ID, model_dir, {})
    cmd = [sys.executable, "-m", "tailorlm.bench.vllm_cli", "serve", *flags, "--host", "127.0.0.1", "--port", str(port)]
    log = open(out_dir / "vllm-serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc)
        yield port
    except Exception:
        log.flush()
        print((out_dir / "vllm-serve.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def our_server(model_dir: str, args, backend: str):
    """Our endpoint (serve stage's own start) on the embedded Ray; yields its port."""
    from ray import serve

    from tailorlm.cluster import init_ray
    from tailorlm.serving.stage import start

    init_ray(num_cpus=os.cpu_count())
    start(bench_config(args, backend), {MODEL_ID: model_dir})
    try:
        wait_healthy(f"http://127.0.0.1:{args.port}/health")
        yield args.port
    finally:
        serve.shutdown()


def compare(model_dir: str, args, out_dir: Path) -> list[dict]:
    """Rounds in which each server (bare, then each backend of ours) comes up, is benched and goes
    down (Ray too), the order rotating by one every round. One server at a time, each in its own
    environment: an idle vLLM engine or Ray cluster beside the measured server slowed it down by up
    to 6x in TTFT on 2 cores. Medians over rounds, and rotation, so that drift in this machine's
    speed (bare vLLM's TPOT moved between 1.8 and 2.6 ms from one round to the next) falls on
    every side alike."""
    import ray

    from tailorlm.bench import rotated

    runs: dict[tuple[str, int], list[dict]] = {}
    sides = ["bare", *args.backends]
    for r in range(args.rounds):
        for side in rotated(sides, r):
            if side == "bare":
                server = bare_server(model_dir, args, out_dir)
            else:
                server = our_server(model_dir, args, side)
            with server as port:
                for c in args.concurrency:
                    runs.setdefault((side, c), []).append(vllm_bench(port, model_dir, c, args, out_dir))
                    print(f"round {r}: {side} c={c} {runs[(side, c)][-1]}", flush=True)
            if side != "bare":
                ray.shutdown()
    rows = []
    for backend in args.backends:
        for c in args.concurrency:
            b, o = (
                {k: statistics.median([r[k] for r in runs[(side, c)]]) for k in runs[(side, c)][0]}
                for side in ("bare", backend)
            )
            rows.append(
                {
                    "backend": backend,
                    "concurrency": c,
                    "bare": b,
                    "ours": o,
                    "throughput_ratio": o["output_throughput"] / b["output_throughput"],
                    "ttft_diff_ms": o["median_ttft_ms"] - b["median_ttft_ms"],
                    "round_ratios": [
                        x["output_throughput"] / y["output_throughput"]
                        for x, y in zip(runs[(backend, c)], runs[("bare", c)])
                    ],
                }
            )
    return rows


def model_folder(args) -> str:
    if args.model:
        return args.model
    if args.run_dir:
        from tailorlm.export.registry import latest_variant
        from tailorlm.runs import RunDir, local_path

        run = Path(args.run_dir).resolve()
        uri, _ = latest_variant(RunDir(str(run.parent), run.name), "bf16")
        return local_path(uri) or uri
    from tailorlm.config import load_config
    from tailorlm.models import resolve_base

    return resolve_base(load_config(None).model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: the run's bf16 export, else the tiny model)")
    ap.add_argument("--run-dir", help="a pipeline run folder: bench its export and save bench/serve.json there")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts-per-slot", type=int, default=8, help="prompts = this x concurrency")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--port", type=int, default=8200, help="ours; bare vllm serve uses port + 1")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each starts every server once, in turn")
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="vLLM --stream-interval (tokens per streamed chunk), given to both servers",
    )
    ap.add_argument(
        "--stream-batching-ms",
        type=float,
        default=None,
        help="our serve.stream_batching_ms (default: the config default)",
    )
    ap.add_argument(
        "--backends",
        nargs="+",
        default=["vllm"],
        choices=["vllm", "ray_llm", "vllm+capture"],
        help="our serving backends to measure (serve.backend)",
    )
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model_dir = model_folder(args)
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(model_dir, args, Path(tmp))
    print(
        f"\nmodel {model_dir}; random prompts, {args.input_len} in / {args.output_len} out tokens; "
        f"medians of {args.rounds} rounds"
    )
    print(
        f"{'backend':>8} {'concurrency':>11} {'bare tok/s':>11} {'ours tok/s':>11} {'ratio':>6} "
        f"{'bare TTFT ms':>13} {'ours TTFT ms':>13} {'diff ms':>8}"
    )
    for row in rows:
        b, o = row["bare"], row["ours"]
        print(
            f"{row['backend']:>8} {row['concurrency']:>11} {b['output_throughput']:11.1f} "
            f"{o['output_throughput']:11.1f} {row['throughput_ratio']:6.2f} {b['median_ttft_ms']:13.1f} "
            f"{o['median_ttft_ms']:13.1f} {row['ttft_diff_ms']:8.1f}   rounds: "
            + " ".join(f"{x:.2f}" for x in row["round_ratios"])
        )
    print("targets: ratio >= 0.95 at every concurrency, TTFT difference <= 10 ms")
    by = {(r["backend"], r["concurrency"]): r["ours"] for r in rows}
    for c in args.concurrency:  # serve.capture's cost: the same server with capture on against off
        on, off = by.get(("vllm+capture", c)), by.get(("vllm", c))
        if on and off:
            print(
                f"capture on / off, concurrency {c}: tok/s {on['output_throughput'] / off['output_throughput']:.3f}, "
                f"median TTFT {on['median_ttft_ms'] - off['median_ttft_ms']:+.1f} ms (target: no measurable cost)"
            )
    if args.run_dir:
        out = Path(args.run_dir) / "bench" / "serve.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {"model": model_dir, "input_len": args.input_len, "output_len": args.output_len, "rows": rows}, indent=1
            )
        )
        print(f"saved {out}")


if __name__ == "__main__":
    main()
