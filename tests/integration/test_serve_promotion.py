"""Promotion on the live stack: the endpoint switches from one registered version to another and
back (rollback) while clients keep sending requests, and every one of them is answered."""

import threading
import time

import httpx
import pytest

from tailorlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = 8021


def test_promote_and_rollback_switch_the_endpoint_without_dropping_requests(ray_local, tiny_model_path, tmp_path):
    from ray import serve

    from tailorlm.export.registry import next_version, promote, register
    from tailorlm.runs import RunDir
    from tailorlm.serving.models import resolve_models
    from tailorlm.serving.promotion import promote_version, rollback_version
    from tailorlm.serving.stage import sample_chat, start

    cfg = load_config(
        None,
        [
            f"run.storage={tmp_path}",
            f"serve.port={PORT}",
            "serve.direct_ingress=false",  # a switch in place needs Serve's proxy (serving/promotion.py)
            "serve.model_id=tiny",
            "serve.engine.max_model_len=512",
        ],
    )
    run = RunDir.from_config(cfg)
    for training in ("first", "second"):  # the same weights under two versions: what serves is in a header
        v = next_version(run, training)
        register(
            run,
            {"version": v, "training": training, "variants": {"bf16": {"status": "published", "uri": tiny_model_path}}},
        )
    promote(run, "1.0.0")
    start(cfg, resolve_models(cfg))
    sample_chat(cfg, "tiny", timeout_s=600)

    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=120) as c:
            while not stop.is_set():
                body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
                r = c.post("/v1/chat/completions", json=body)
                seen.append((r.status_code, r.headers.get("x-tailorlm-version")))

    def wait_for(version: str) -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if seen and (seen[-1][1] or "").startswith(version):
                return
            time.sleep(0.5)
        raise AssertionError(f"the endpoint never answered as {version}: {seen[-5:]}")

    threads = [threading.Thread(target=client) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_for("1.0.0")
        assert "promoted 1.1.0" in promote_version(cfg, "1.1.0")
        wait_for("1.1.0")
        assert "rolled back to 1.0.0" in rollback_version(cfg)
        wait_for("1.0.0")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
        serve.shutdown()
    codes = [c for c, _ in seen]
    assert codes and set(codes) == {200}, [s for s in seen if s[0] != 200][:5]
    order = [v.split("+")[0] for _, v in seen]
    switches = [b for a, b in zip(order, order[1:]) if a != b]
    assert switches == ["1.1.0", "1.0.0"], switches  # one switch each way, no flapping between replicas
