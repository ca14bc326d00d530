"""The serve stage: host the exported model(s) on vLLM behind Ray Serve, answer a sample chat.

    tailorlm serve jobs/configs/tiny_cpu.yaml serve.keep_serving=true

Hosts the newest registered export's variants (serve.variants) under serve.model_id, checks the
endpoint with the official openai client, writes serve/endpoint.json, and shuts down gracefully
unless serve.keep_serving is true (then it serves until interrupted).
"""

from __future__ import annotations

import os
import time
from typing import Any

from tailorlm.config import PipelineConfig
from tailorlm.runs import RunDir, StageDir
from tailorlm.serving.models import resolve_models

SAMPLE = "What is the capital of Daleglen?"
APP_NAME = "tailorlm"


def sample_chat(cfg: PipelineConfig, model_id: str, question: str = SAMPLE, timeout_s: float = 600) -> dict[str, Any]:
    """Wait for the endpoint, then ask one chat question with the official openai client. An
    answer (or question) the configured content filters withhold is a served request too: it is
    recorded as withheld, never a failed start."""
    import openai

    from tailorlm.serving.keys import read_keys
    from tailorlm.serving.security import LOCAL_HOSTS

    sc = cfg.serve
    host = "127.0.0.1" if sc.host in LOCAL_HOSTS | {"0.0.0.0"} else sc.host
    keys = read_keys(sc.guard)
    client = openai.OpenAI(
        base_url=f"http://{host}:{sc.port}/v1", api_key=keys[0] if keys else "none", max_retries=0, timeout=120
    )
    deadline = time.time() + timeout_s
    while True:
        t = time.time()
        try:
            resp = client.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
            )
            return {
                "question": question,
                "answer": resp.choices[0].message.content,
                "latency_s": round(time.time() - t, 3),
                "usage": resp.usage.model_dump() if resp.usage else None,
            }
        except openai.BadRequestError as exc:
            error = (exc.body or {}) if isinstance(exc.body, dict) else {}
            if error.get("type") != "content_filter" and (error.get("error") or {}).get("type") != "content_filter":
                raise RuntimeError(f"serve: the sample request was refused: {exc}") from exc
            return {
                "question": question,
                "answer": None,
                "withheld": "content_filter",
                "latency_s": round(time.time() - t, 3),
                "usage": None,
            }
        except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError) as exc:
            # not up yet: nothing listens, the proxy has no route yet (404), or no replica (503)
            if time.time() > deadline:
                raise RuntimeError(f"serve: endpoint did not answer within {timeout_s}s: {exc}") from exc
            time.sleep(2)


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _node_count() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def start(cfg: PipelineConfig, models: dict[str, str]) -> None:
    from ray import serve

    from tailorlm.serving.app import build_app

    sc = cfg.serve
    direct = sc.uses_direct_ingress()
    if direct and _node_count() > 1:
        # the replica would answer on the port of whichever node it lands on, not through this
        # (the driver's) node, where users and the sample request come in
        if sc.direct_ingress:
            raise ValueError(
                "serve.direct_ingress: true serves from the replica's own node, but this Ray cluster "
                "has several nodes; set serve.direct_ingress=false (requests then enter through "
                "Ray Serve's proxy on this node)"
            )
        print("[serve] several Ray nodes: requests go through Ray Serve's proxy (no direct ingress)")
        direct = False
    if direct and _serve_running():
        # the controller's settings are fixed when it starts; an existing one runs without direct ingress
        if sc.direct_ingress:
            raise RuntimeError(
                "serve: a Ray Serve instance is already running in this cluster; direct ingress "
                "needs a fresh one (`serve shutdown`), or set serve.direct_ingress=false"
            )
        print("[serve] Ray Serve is already running here: requests go through its proxy (no direct ingress)")
        direct = False
    # Only a controller started here gets these settings (a running one keeps its own), so
    # `serve deploy` setups run Ray's defaults.
    from tailorlm.serving.engine import NO_FORWARDED_FOR

    controller_env = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(sc.controller_loop_s), **NO_FORWARDED_FOR}
    http = {"host": sc.host, "port": sc.port}
    if direct:
        from tailorlm.serving.engine import direct_ingress_env

        # Requests reach the replica without a hop through Ray Serve's proxy, which on 2 cores cost
        # 0.2-0.5x of the throughput of bare `vllm serve` (bench/serve.py). Ray keeps a proxy on the
        # head node all the same; it moves to port + 1.
        controller_env.update(direct_ingress_env(sc.port))
        http["port"] = sc.port + 1
    serve.start(http_options=http, controller_options={"runtime_env": {"env_vars": controller_env}})
    serve.run(build_app(cfg, models, direct_ingress=direct), name=APP_NAME, route_prefix="/", blocking=False)


def sample_question(run_dir: RunDir) -> tuple[str, str | None]:
    """The question the stage asks its endpoint, and the reference answer: the first held-out
    (eval split) chat question of the run's data whose reference states a fact, so the sample
    shows what finetuning taught on a question training never showed; SAMPLE when the run has
    no such row."""
    import json

    import pyarrow.dataset as pads
    from fsspec.core import url_to_fs

    from tailorlm.train.evaluate import answer_fact

    data = run_dir.stage("data")
    if not data.is_complete():
        return SAMPLE, None
    fs, path = url_to_fs(data.sub("kept"))
    # at most the first 1000 eval rows in file order (never the whole split, which may be large),
    # then the first of them by text: the same question on every run of the same data
    head = pads.dataset(path, filesystem=fs, format="parquet").head(
        1000, columns=["text", "messages"], filter=pads.field("split") == "eval"
    )
    for row in sorted(head.to_pylist(), key=lambda r: r["text"] or ""):
        msgs = json.loads(row["messages"]) if row.get("messages") else None
        if msgs and len(msgs) == 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant":
            if answer_fact(msgs[0]["content"], msgs[1]["content"]):
                return msgs[0]["content"], msgs[1]["content"]
    return SAMPLE, None


def run(cfg: PipelineConfig, run_dir: RunDir, sdir: StageDir) -> dict[str, Any]:
    from ray import serve

    from tailorlm.train.evaluate import answer_fact, fact_correct

    models = resolve_models(cfg)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    start(cfg, models)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    try:
        question, reference = sample_question(run_dir)
        answer = sample_chat(cfg, cfg.serve.model_id, question)
        if reference is not None:
            answer["reference"] = reference
            answer["fact"] = " ".join(answer_fact(question, reference))
            answer["fact_correct"] = bool(answer["answer"] and fact_correct(question, answer["answer"], reference))
        version = served_version(run_dir)
        info = {"url": url, "models": models, "sample": answer, "version": version}
        sdir.write_json("endpoint.json", info)
        print(f"[serve] {url}  models: {', '.join(models)}  version {version}")
        shown = answer["answer"] if answer["answer"] is not None else "(withheld by the content filter)"
        verdict = ""
        if reference is not None:
            verdict = f"; {'right' if answer['fact_correct'] else 'wrong'}: the reference says {answer['fact']!r}"
        print(f"[serve] Q (held out): {question}\n[serve] A: {shown}  ({answer['latency_s']}s{verdict})")
        if cfg.serve.keep_serving:
            print("[serve] serving until interrupted (Ctrl-C)")
            while True:
                time.sleep(3600)
    finally:
        if not cfg.serve.keep_serving:
            serve.delete(APP_NAME)  # graceful: Serve drains in-flight requests before replicas stop
            serve.shutdown()
    return {
        "url": url,
        "models": list(models),
        "question": question,
        "answer": answer["answer"],
        "fact_correct": answer.get("fact_correct"),
    }


def served_version(run_dir: RunDir) -> str:
    """The version served, saying so when a newer export awaits promotion."""
    from tailorlm.export.registry import read_registry, served_entry

    served, newest = served_entry(run_dir)["version"], read_registry(run_dir)[-1]["version"]
    if newest != served:
        print(f"[serve] serving the promoted {served}; {newest} is newer (`tailorlm promote --to {newest}`)")
    return served


def recap(s: dict[str, Any]) -> str:
    """One line for the end of `tailorlm run`."""
    verdict = {True: " (right)", False: " (wrong)"}.get(s.get("fact_correct"), "")
    asked = f"{s['question']!r} -> " if s.get("question") else "answered: "
    return f"{s['url']} {asked}{s['answer']!r}{verdict}"
