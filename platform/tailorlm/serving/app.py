"""The Ray Serve application: vLLM behind an OpenAI-compatible HTTP API and our Guard.

    serve run serve.app:app                    # development (serve/app.py)
    serve deploy serve/config.yaml             # on a cluster: import_path tailorlm.serving.app:build_from_args

serve.backend picks how vLLM is hosted:
- vllm (default, serving/engine.py): one deployment whose replica runs vLLM's own OpenAI app
  around an in-process AsyncLLM; measured fastest, serves local LoRA adapters.
- ray_llm (below): Ray's `ray.serve.llm`. Each hosted variant is an `LLMConfig` (one vLLM engine
  deployment, autoscaled by our config); the ingress is Ray's own `OpenAiIngress`, built with
  `make_fastapi_ingress` on a FastAPI app we create so that our Guard middleware wraps it:
  `build_openai_app` offers no way to add middleware to the app it creates, so we assemble the
  same two pieces it does. Those builder helpers are internal to ray.llm; ray is pinned to 2.60.
"""

from __future__ import annotations

from typing import Any

from tailorlm.config import PipelineConfig, load_config


def llm_config(cfg: PipelineConfig, model_id: str, model_dir: str):
    from ray.serve.llm import LLMConfig

    sc = cfg.serve
    kwargs: dict[str, Any] = {}
    if not sc.engine.use_gpu:
        kwargs["accelerator_config"] = {"kind": "cpu"}  # unset, the replica waits for a GPU forever
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_dir},
        engine_kwargs={
            "max_model_len": sc.engine.max_model_len,
            "dtype": sc.engine.dtype(),
            "gpu_memory_utilization": sc.engine.memory_share(),
        },
        deployment_config={
            "autoscaling_config": {
                "min_replicas": sc.replicas.min,
                "max_replicas": sc.replicas.max,
                "target_ongoing_requests": sc.replicas.target_ongoing_requests,
            },
            "max_queued_requests": sc.replicas.max_queued_requests,
        },
        log_engine_metrics=True,
        experimental_configs={"stream_batching_interval_ms": sc.stream_batching_ms},
        **kwargs,
    )


def build_app(cfg: PipelineConfig, models: dict[str, str], direct_ingress: bool = False):
    """models: model_id -> HF folder (a local path or a storage URI). Returns a Ray Serve
    Application. direct_ingress: only where the caller also starts the Serve controller for it
    (serving/stage.py)."""
    if cfg.serve.backend == "vllm":
        from tailorlm.serving.engine import build_engine_app

        return build_engine_app(cfg, models, direct_ingress)
    return build_ray_llm_app(cfg, models)


def build_ray_llm_app(cfg: PipelineConfig, models: dict[str, str]):
    from fastapi.responses import JSONResponse
    from ray import serve
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init, make_fastapi_ingress
    from ray.serve.llm import build_llm_deployment

    from tailorlm.serving.models import guard_settings
    from tailorlm.serving.security import Guard

    sc = cfg.serve
    settings = guard_settings(cfg)
    from tailorlm.models import local_model

    # Ray's LLM engine copies s3:// and gs:// model sources on the node it runs on; other
    # locations must be folders on the node (a local path or a copy made here)
    configs = {
        mid: llm_config(cfg, mid, uri if uri.startswith(("s3://", "gs://")) else local_model(uri))
        for mid, uri in models.items()
    }
    deployments = {mid: build_llm_deployment(c, name_prefix=f"{mid}:") for mid, c in configs.items()}
    fastapi_app = init()

    @fastapi_app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "models": sorted(models)})

    fastapi_app.add_middleware(Guard, settings=settings)
    ingress_cls = make_fastapi_ingress(OpenAiIngress, app=fastapi_app)
    options = OpenAiIngress.get_deployment_options(list(configs.values()))
    # On a 2-CPU node the ingress must not reserve a CPU, or it is never scheduled beside the engine.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    options["max_queued_requests"] = sc.replicas.max_queued_requests
    from ray.llm._internal.serve.core.ingress.builder import to_model_metadata

    cards = {mid: to_model_metadata(mid, c) for mid, c in configs.items()}
    return serve.deployment(ingress_cls, **options).bind(llm_deployments=deployments, model_cards=cards)


def build_from_args(args: dict[str, Any]):
    """Serve application builder for `serve deploy` / `serve run` (args from serve/config.yaml)."""
    from tailorlm.serving.models import resolve_models

    cfg = load_config(args.get("config"), args.get("overrides") or [])
    return build_app(cfg, resolve_models(cfg))
