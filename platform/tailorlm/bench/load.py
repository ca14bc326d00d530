"""Overload and disconnects: our endpoint at 1x, 2x and 4x its capacity, then clients hanging up.

    python -m tailorlm.bench.load                       # the tiny factory model, capacity 8
    python -m tailorlm.bench.load --capacity 16 --levels 1 2 4 8

Capacity is what the guard admits into the replica at once (serve.replicas.max_ongoing_requests +
serve.replicas.max_queued_requests); beyond it a request should get 503 with Retry-After at once, never
wait in a queue and never see another 5xx. At each level, level x capacity clients each send
--rounds non-streamed completions (ignore_eos, --output-len tokens). Prints, per level, the
counts of 2xx / 429 / 503 / other 5xx, the share of 429/503 that carried Retry-After and p50/p99
latency of answered and of shed requests. Then --drops clients ask for long generations and hang
up (non-streamed: read timeout; streamed: stop reading); the engine's unfinished requests are
read from the replica a moment later: 0 means the disconnects aborted the work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

KEY = "bench-load-key"


def config(args):
    from tailorlm.config import load_config

    ongoing = max(1, args.capacity // 2)
    return load_config(
        None,
        [
            f"serve.port={args.port}",
            "serve.model_id=demo",
            "serve.engine.max_model_len=1024",
            f"serve.replicas.max_ongoing_requests={ongoing}",
            f"serve.replicas.max_queued_requests={max(1, args.capacity - ongoing)}",
            "serve.guard.max_tokens_cap=1000",
            "serve.guard.max_n=4",
            "serve.guard.rate_limit_per_minute=1000000",
            "serve.guard.tokens_per_minute=1000000000",
            f"serve.guard.api_keys=[{KEY}]",
        ],
    )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def level(url: str, clients: int, rounds: int, output_len: int) -> dict:
    import httpx

    results: list[tuple[int, bool, float]] = []
    openai_shaped = [0]  # 429/503 bodies that are OpenAI error objects (the guard's, not Serve's text/plain)
    body = {"model": "demo", "prompt": "The capital of Daleglen is", "max_tokens": output_len, "ignore_eos": True}

    async def client(c: httpx.AsyncClient):
        for _ in range(rounds):
            t = time.perf_counter()
            try:
                r = await c.post("/v1/completions", json=body)
                results.append((r.status_code, "retry-after" in r.headers, time.perf_counter() - t))
                if r.status_code in (429, 503) and r.headers.get("content-type") == "application/json":
                    openai_shaped[0] += "error" in r.json()
            except httpx.HTTPError:
                results.append((-1, False, time.perf_counter() - t))

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600, limits=limits
    ) as c:
        await asyncio.gather(*[client(c) for _ in range(clients)])
    codes = [s for s, _, _ in results]
    shed = [(s, ra, t) for s, ra, t in results if s in (429, 503)]
    return {
        "clients": clients,
        "2xx": sum(200 <= s < 300 for s in codes),
        "429": codes.count(429),
        "503": codes.count(503),
        "5xx": sum(s >= 500 and s != 503 for s in codes),
        "errors": codes.count(-1),
        "openai": openai_shaped[0] / len(shed) if shed else 1.0,
        "retry_after": sum(ra for _, ra, _ in shed) / len(shed) if shed else 1.0,
        "p50_ok": pct([t for s, _, t in results if s == 200], 0.5),
        "p99_ok": pct([t for s, _, t in results if s == 200], 0.99),
        "p50_shed": pct([t for _, _, t in shed], 0.5),
        "p99_shed": pct([t for _, _, t in shed], 0.99),
    }


async def drops(url: str, n: int, stream: bool) -> int:
    import httpx

    body = {"model": "demo", "prompt": "x", "max_tokens": 1000, "n": 2, "ignore_eos": True, "stream": stream}

    async def hang_up():
        try:
            async with httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(0.5)
            ) as c:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    async for i, _ in _enum(r.aiter_bytes()):
                        if i >= 3:
                            return 1
        except httpx.TimeoutException:
            return 1
        return 0

    return sum(await asyncio.gather(*[hang_up() for _ in range(n)]))


async def _enum(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (default: the tiny factory model)")
    ap.add_argument("--port", type=int, default=8050)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--drops", type=int, default=4)
    args = ap.parse_args()

    from ray import serve

    from tailorlm.cluster import init_ray
    from tailorlm.config import load_config
    from tailorlm.models import resolve_base
    from tailorlm.serving.stage import start

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    model = args.model or resolve_base(load_config(None).model)
    init_ray(num_cpus=os.cpu_count())
    cfg = config(args)
    start(cfg, {"demo": model})
    url = f"http://127.0.0.1:{args.port}"
    try:
        from tailorlm.bench.serve import wait_healthy

        wait_healthy(url + "/health")
        handle = serve.get_deployment_handle("engine", app_name="tailorlm")
        asyncio.run(level(url, 2, 1, args.output_len))  # warm-up
        print(
            f"capacity {cfg.serve.guard_capacity()} (max_ongoing_requests {cfg.serve.replicas.max_ongoing_requests} + "
            f"max_queued_requests {cfg.serve.replicas.max_queued_requests}), {args.rounds} requests per client, "
            f"{args.output_len} tokens each"
        )
        print(
            "| load | clients | 2xx | 429 | 503 | other 5xx | conn. errors | Retry-After on 429/503 | "
            "OpenAI error body on 429/503 | p50 / p99 answered (s) | p50 / p99 shed (s) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for lv in args.levels:
            r = asyncio.run(level(url, lv * cfg.serve.guard_capacity(), args.rounds, args.output_len))
            print(
                f"| {lv}x | {r['clients']} | {r['2xx']} | {r['429']} | {r['503']} | {r['5xx']} | {r['errors']} | "
                f"{r['retry_after']:.0%} | {r['openai']:.0%} | {r['p50_ok']:.2f} / {r['p99_ok']:.2f} | "
                f"{r['p50_shed']:.3f} / {r['p99_shed']:.3f} |"
            )
        for stream in (False, True):
            dropped = asyncio.run(drops(url, args.drops, stream))
            t = time.time()
            unfinished = handle.unfinished_requests.remote().result()
            while unfinished and time.time() - t < 5:
                time.sleep(0.1)
                unfinished = handle.unfinished_requests.remote().result()
            print(
                f"disconnects ({'streamed' if stream else 'non-streamed'}): {dropped} of {args.drops} clients hung "
                f"up mid-generation (n=2, 1000 tokens); engine requests unfinished {time.time() - t:.1f} s later: "
                f"{unfinished}"
            )
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
