"""The default serving backend: one Ray Serve deployment that runs vLLM's own OpenAI server app
around an in-process `AsyncLLM`, behind our Guard.

Why not ray.serve.llm (still available as serve.backend=ray_llm): our benchmark
(`python -m tailorlm.bench.serve`) measured it at 0.41x bare `vllm serve` output tokens/s at
concurrency 1 and 0.50x at 8, with +28 ms median time to first token. There, every streamed token
crosses two Ray hops (HTTP proxy -> ingress replica -> engine replica) before it leaves. Here the
proxy calls one replica, and inside it the request meets exactly the code `vllm serve` runs
(vLLM's FastAPI routes, renderer and AsyncLLM), so the only extra cost is the proxy hop; with
one replica (serve.direct_ingress) even that goes: the replica answers HTTP itself. The
same replica also serves LoRA adapters from local folders, which Ray's LLM loader does not
(it accepts s3/gs/azure only). ray_llm remains the choice for engines spread over several GPUs
(tensor/pipeline parallel placement groups), which this backend does not manage.

Several hosted models (variants, an A/B pair) live in one replica, one AsyncLLM each; a small
ASGI router sends each request to the app of the model it names.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from tailorlm.config import ServeConfig
from tailorlm.serving.replies import replay

# the engine may never log prompts: vLLM logs requests only with --enable-log-requests, which
# vllm_argv refuses to pass on from serve.engine.args
REFUSED_ENGINE_ARGS = {"enable-log-requests", "enable-log-outputs", "api-key", "disable-fastapi-docs"}


def vllm_argv(sc: ServeConfig, model_id: str, model_dir: str, adapters: dict[str, str]) -> list[str]:
    """The `vllm serve` command line for one hosted model: the benchmark starts bare vLLM with the
    same flags, so the two differ only in what sits in front of the engine."""
    argv = [
        "--model",
        model_dir,
        "--served-model-name",
        model_id,
        "--max-model-len",
        str(sc.engine.max_model_len),
        "--dtype",
        sc.engine.dtype(),
        "--gpu-memory-utilization",
        str(sc.engine.memory_share()),
    ]
    if adapters:
        argv += [
            "--enable-lora",
            "--max-lora-rank",
            str(sc.engine.max_lora_rank),
            "--lora-modules",
            *[json.dumps({"name": n, "path": p, "base_model_name": model_id}) for n, p in adapters.items()],
        ]
    for key, value in sc.engine.args.items():  # any other `vllm serve` flag, e.g. {enable-prefix-caching: true}
        if key.replace("_", "-") in REFUSED_ENGINE_ARGS:
            raise ValueError(
                f"serve.engine.args.{key}: not allowed here (request logging would put prompts in "
                "the logs; keys and docs are the guard's)"
            )
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


async def build_model_app(argv: list[str]):
    """vLLM's OpenAI app for one model, as `vllm serve <argv>` builds it, minus the HTTP server."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    from tailorlm.serving.engine_metrics import EngineStatLogger

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    validate_parsed_serve_args(args)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    # engine metrics (tokens, latency, queue) go to Ray's Prometheus endpoint, as ray.serve.llm does
    engine = AsyncLLM.from_vllm_config(
        config, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=[EngineStatLogger]
    )
    tasks = await engine.get_supported_tasks()
    app = build_app(args, tasks, engine.model_config)
    await init_app_state(engine, app.state, args, tasks)
    return app, engine


class ModelRouter:
    """ASGI app: requests go to the vLLM app hosting the model (or adapter) named in the body;
    /v1/models lists them all. Only the routes the Guard admits reach it."""

    def __init__(self, apps: dict[str, Any], names: dict[str, str]):
        self.apps, self.names = apps, names  # model_id -> app; served name (model or adapter) -> model_id
        self.first = next(iter(apps.values()))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":  # the vLLM apps were started by the deployment, not by lifespan
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["type"] != "http":
            return await self.first(scope, receive, send)
        if scope["path"] == "/v1/models" and scope["method"] == "GET":
            cards = []
            for app in self.apps.values():
                listed = await app.state.openai_serving_models.show_available_models()
                cards += [public_card(c.model_dump()) for c in listed.data]
            return await _json(send, 200, {"object": "list", "data": cards})
        if scope["method"] != "POST" or len(self.apps) == 1:
            return await self.first(scope, receive, send)
        body, more = b"", True
        while more:  # the Guard has already capped the size
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        try:
            model = json.loads(body).get("model")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            model = None
        target = self.apps.get(self.names.get(model, ""), self.first)  # vLLM answers an unknown name with 404
        return await target(scope, replay(body, receive), send)


def public_card(card: dict) -> dict:
    """vLLM's model card names the model's folder on the server (`root`); clients need the name."""
    return {**card, "root": card.get("id")}


async def _json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class StreamCoalescer:
    """ASGI wrapper: while a streamed body's chunks come faster than one per `window_s`, they go
    out merged, at most one message per window; a chunk after a quiet spell (the first two of a
    stream, in particular, so time to first token is untouched) and the end of the body go out
    at once. Why: every message a replica sends crosses the Ray Serve proxy as its own object,
    about a millisecond of CPU each, so a tiny model streaming a token every 3 ms spent more time
    forwarding than generating. vLLM's --stream-interval batches by token count instead, which
    would also delay the first token of every burst."""

    def __init__(self, app, window_s: float):
        self.app, self.window = app, window_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.window <= 0:
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        state = {"last": 0.0, "sent": 0, "timer": None}
        buf: list[bytes] = []

        async def push(body: bytes, more: bool):
            state["last"], state["sent"] = loop.time(), state["sent"] + 1
            await send({"type": "http.response.body", "body": body, "more_body": more})

        async def flush_later(delay: float):
            await asyncio.sleep(delay)
            state["timer"] = None  # from here on the flush runs to the end; no one cancels it
            if buf:
                body = b"".join(buf)
                buf.clear()
                await push(body, True)

        async def coalescing_send(msg):
            if msg["type"] != "http.response.body":
                return await send(msg)
            more = msg.get("more_body", False)
            if not more:  # end of body: what is buffered goes with it, now
                if state["timer"] is not None:
                    state["timer"].cancel()
                    state["timer"] = None
                body = b"".join(buf) + msg.get("body", b"")
                buf.clear()
                return await push(body, False)
            wait = state["last"] + self.window - loop.time()
            if not buf and (state["sent"] < 2 or wait <= 0):
                return await push(msg.get("body", b""), True)
            buf.append(msg.get("body", b""))
            if state["timer"] is None:
                state["timer"] = asyncio.create_task(flush_later(max(wait, 0)))

        try:
            await self.app(scope, receive, coalescing_send)
        finally:
            if state["timer"] is not None:
                state["timer"].cancel()


class EngineServer:
    """The replica: starts one AsyncLLM per hosted model, then serves Guard(ModelRouter)."""

    async def __init__(self, serve_cfg: dict[str, Any], settings, models: dict[str, str], adapters: dict[str, str]):
        from transformers import AutoTokenizer

        from tailorlm.models import local_model

        self.sc, self.settings = ServeConfig(**serve_cfg), settings
        # storage URIs: this replica may run on any node, so it copies them into its own cache
        models = {model_id: local_model(uri) for model_id, uri in models.items()}
        # the guard counts prompt tokens and reads token-id prompts with the hosted model's tokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(next(iter(models.values())))
        self.apps, self.engines, self.names = {}, [], {}
        gpu_ids = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if self.sc.engine.use_gpu else []
        for i, (model_id, model_dir) in enumerate(models.items()):
            mine = adapters if i == 0 else {}  # adapters attach to the first (primary) model
            if gpu_ids:  # one GPU per hosted model: the engine process inherits this at spawn
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu_ids[i % len(gpu_ids)]
            app, engine = await build_model_app(vllm_argv(self.sc, model_id, model_dir, mine))
            self.apps[model_id] = app
            self.engines.append(engine)
            self.names.update({model_id: model_id, **{name: model_id for name in mine}})
        if gpu_ids:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)

    def __serve_build_asgi_app__(self):
        from tailorlm.serving.security import Guard

        router = ModelRouter(self.apps, self.names)
        self.guard = Guard(router, self.settings, self.tokenizer)
        return StreamCoalescer(self.guard, self.sc.stream_batching_ms / 1000)

    def vllm_routes(self) -> list[tuple[str, list[str]]]:
        """(path, methods) of every route vLLM's app mounts: the tests walk them all."""
        app = next(iter(self.apps.values()))
        return [(r.path, sorted(getattr(r, "methods", None) or ["WEBSOCKET"])) for r in app.routes]

    def unfinished_requests(self) -> int:
        """Requests the engines are still running (generating or waiting)."""
        return sum(e.output_processor.get_num_unfinished_requests() for e in self.engines)

    async def check_health(self) -> None:
        for engine in self.engines:  # a dead engine process makes Serve replace this replica
            await engine.check_health()

    def __del__(self):
        capture = getattr(getattr(self, "guard", None), "capture", None)
        if capture is not None:  # rows still queued (at most serve.capture.flush_s of traffic)
            capture.flush_sync()
        for engine in getattr(self, "engines", []):
            engine.shutdown()


# Serve runs uvicorn with its defaults, which trust X-Forwarded-For from 127.0.0.1: any process on
# the node (any Ray job among them) could then claim any client address, past serve.guard.allow_ips and
# the per-address key-guessing limit. No proxy of ours sets it, so trust it from nowhere.
NO_FORWARDED_FOR = {"FORWARDED_ALLOW_IPS": ""}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment for the Serve controller and the replica under Ray's direct ingress: the one
    replica serves HTTP on `port` itself. Ray holds a released port back (quarantine) and drains a
    stopping replica for 30 s so an external load balancer can deregister it; with no such balancer
    either would only keep a restarted replica off its port and slow shutdown."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def build_engine_app(cfg, models: dict[str, str], direct_ingress: bool = False):
    """The Ray Serve application for serve.backend=vllm. direct_ingress: the replica serves HTTP on
    serve.port itself (the Serve controller must run with `direct_ingress_env` too)."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    from tailorlm.serving.models import guard_settings

    sc = cfg.serve
    adapters = resolve_adapters(sc, models)
    refuse_cpu_quantized_deepseek(sc, models)
    settings = guard_settings(cfg)  # read here: keys set in this process's environment count
    actor: dict[str, Any] = {"num_cpus": sc.replicas.cpus}
    if sc.engine.use_gpu:
        actor["num_gpus"] = len(models)
    env = {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND") if k in os.environ}
    # Ray starts workers at niceness 15, and vLLM's engine process inherits it: on a busy node
    # every normal-priority process (a client, a data job) would then preempt token generation.
    # Ray's own job supervisor starts drivers at 0 the same way.
    env["RAY_worker_niceness"] = "0"
    # Serve runs user code on a thread of its own by default, so every streamed chunk would cross
    # threads; the engine server is all asyncio (AsyncLLM), so it can share the replica's loop.
    env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
    env.update(NO_FORWARDED_FOR)
    if direct_ingress:
        env.update(direct_ingress_env(sc.port))
    actor["runtime_env"] = {"env_vars": env}
    deployment = serve.deployment(
        serve.ingress()(EngineServer),
        name="engine",
        ray_actor_options=actor,
        autoscaling_config={
            "min_replicas": sc.replicas.min,
            "max_replicas": sc.replicas.max,
            "target_ongoing_requests": sc.replicas.target_ongoing_requests,
        },
        # The guard sheds load beyond its capacity with an OpenAI-style 503 and Retry-After. Serve's own
        # limits sit well above it, so that Serve's text/plain 503 does not come first: under direct
        # ingress Serve counts a burst's arrivals as queued until each takes a slot, and a queue limit
        # near the guard's shed a third of a 2x burst itself (bench/load.py). What Serve still sheds
        # carries Retry-After too.
        # (x2: requests still sending their bodies count against the guard's capacity as well)
        max_ongoing_requests=2 * sc.guard_capacity() + 64,
        max_queued_requests=4 * (sc.guard_capacity() + 64),
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        health_check_period_s=10,
        graceful_shutdown_timeout_s=30,
    )
    return deployment.bind(sc.model_dump(mode="json"), settings, models, adapters)


def refuse_cpu_quantized_deepseek(sc: ServeConfig, models: dict[str, str]) -> None:
    """vLLM's CPU int8/int4 MoE kernels route only softmax top-k: a DeepSeek model with
    quantized experts fails at engine start ("No Int8 MoE backend supports the deployment
    configuration"). Any folder, hub or factory, is refused here, naming it."""
    import json

    import fsspec

    if sc.engine.use_gpu:
        return
    for name, folder in models.items():
        with fsspec.open(folder.rstrip("/") + "/config.json") as fh:
            config = json.load(fh)
        if str(config.get("model_type", "")).startswith("deepseek") and "quantization_config" in config:
            raise ValueError(
                f"serve.variants: {name} ({folder}) is a DeepSeek model with quantized experts, which vLLM's "
                "CPU build cannot serve (its int8/int4 MoE kernels route only softmax top-k); serve bf16 on "
                "CPU, or set serve.engine.use_gpu"
            )


def resolve_adapters(sc: ServeConfig, models: dict[str, str] | None = None) -> dict[str, str]:
    """serve.lora_adapters as absolute local folders; a missing or non-peft folder fails here,
    before any replica starts, naming the adapter. So does LoRA on a Mixture-of-Experts base
    on CPU: vLLM's CPU build takes its Triton fused-MoE LoRA path, which has no CPU backend,
    and the engine then fails every request, base-model ones included."""
    import json
    from pathlib import Path

    import fsspec

    from tailorlm.families import is_moe_config

    if sc.lora_adapters and models and not sc.engine.use_gpu:
        base = models[sc.model_id] if sc.model_id in models else next(iter(models.values()))
        with fsspec.open(base.rstrip("/") + "/config.json") as fh:
            if is_moe_config(json.load(fh)):
                raise ValueError(
                    f"serve.lora_adapters: {base} is a Mixture-of-Experts model, and vLLM's CPU build cannot "
                    "serve LoRA on one (its fused-MoE LoRA kernels need Triton); serve the merged model "
                    "(train.merge_adapter: true, then export) or set serve.engine.use_gpu"
                )
    out = {}
    for name, path in sc.lora_adapters.items():
        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(
                f"serve.lora_adapters.{name}: {path} is not a peft adapter folder (no adapter_config.json)"
            )
        if name in sc.hosted_ids():
            raise ValueError(f"serve.lora_adapters.{name}: the name is taken by a hosted model")
        out[name] = str(folder)
    return out
