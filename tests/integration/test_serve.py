"""The real stack, default backend: vLLM's OpenAI app around AsyncLLM in one Ray Serve replica,
our guard, the openai client. Two engines (the same weights under two names) and a LoRA adapter
from a local folder share the replica."""

import os

import httpx
import pytest

from tailorlm.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PORT = 8011
CAP = 900  # long enough that an aborted request is told from a finished one


def make_adapter(base: str, out) -> str:
    """A peft LoRA adapter with large random B matrices, so that it visibly changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_path, tmp_path_factory):
    from ray import serve

    from tailorlm.serving.stage import sample_chat, start

    os.environ["TAILORLM_API_KEYS"] = "test-key"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    adapter = make_adapter(tiny_model_path, tmp_path_factory.mktemp("adapter"))
    cfg = load_config(
        None,
        [
            f"serve.port={PORT}",
            "serve.guard.require_api_key=true",
            "serve.engine.max_model_len=1024",
            f"serve.guard.max_tokens_cap={CAP}",
            "serve.model_id=tiny",
            "serve.guard.openapi_schema=true",
            "serve.guard.max_n=2",
            "serve.guard.max_prompts=2",
            "serve.replicas.max_ongoing_requests=4",
            "serve.replicas.max_queued_requests=4",
            "serve.guard.blocklist=['forbidden-word']",
            f"serve.lora_adapters={{tiny-lora: {adapter}}}",
            # schemathesis sends a wrong key per case to every route: at the default allowance the
            # address would be throttled (429) for the tests after it
            "serve.guard.auth_failures_per_minute=1000",
            "serve.capture.enabled=true",
            "serve.capture.flush_s=0.5",
            f"run.storage={tmp_path_factory.mktemp('runs')}",
        ],
    )
    start(cfg, {"tiny": tiny_model_path, "tiny-b": tiny_model_path})
    first = sample_chat(cfg, "tiny", timeout_s=600)
    yield cfg, first
    serve.delete("tailorlm")
    serve.shutdown()


def test_openai_client_chat_completions_and_streaming(served):
    import openai

    cfg, first = served
    assert isinstance(first["answer"], str) and first["usage"]["completion_tokens"] >= 1
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="test-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-lora", "tiny-b"]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.prompt_tokens > 5
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True
        )
    )
    assert (
        len(chunks) >= 2 and chunks[-1].choices[-1].finish_reason in ("length", "stop")
        if chunks[-1].choices
        else len(chunks) >= 2
    )
    comp = client.completions.create(model="tiny", prompt="The capital of", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens >= 1
    # direct ingress (the default for one replica): the replica itself answers on PORT, and the
    # proxy Ray keeps on the head node moved to PORT + 1; both run the same guarded app
    assert httpx.get(f"http://127.0.0.1:{PORT + 1}/v1/models").status_code == 401
    assert (
        httpx.get(f"http://127.0.0.1:{PORT + 1}/v1/models", headers={"Authorization": "Bearer test-key"}).json()[
            "data"
        ][0]["id"]
        == "tiny"
    )


def test_models_and_adapters_route_by_name(served):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="test-key", max_retries=0)

    def greedy(model: str) -> str:
        return (
            client.completions.create(model=model, prompt="The capital of Daleglen is", max_tokens=12, temperature=0)
            .choices[0]
            .text
        )

    base = greedy("tiny")
    assert greedy("tiny-b") == base  # the same weights in a second engine
    assert greedy("tiny-lora") != base  # the adapter is applied


def test_errors_are_4xx_with_openai_bodies(served):
    base = f"http://127.0.0.1:{PORT}"
    auth = {"Authorization": "Bearer test-key"}
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        r = c.post(
            "/v1/chat/completions", headers=auth, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "word " * 1200, "max_tokens": 4})
        assert 400 <= r.status_code < 500 and "error" in r.json()
        r = c.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "x", "max_tokens": 1000})
        assert r.status_code == 400
        r = c.post(
            "/v1/chat/completions",
            headers=auth,
            json={"model": "tiny", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]},
        )
        assert 400 <= r.status_code < 500 and "error" in r.json()


def test_engine_and_guard_metrics_reach_rays_prometheus_endpoint(served):
    """After the requests above: vLLM's token counters (through serving.engine_metrics) and the
    guard's request counter, per model, on the node's metrics export port."""
    import re
    import time

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # the agent exports every few seconds
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        tokens = [float(v) for v in re.findall(r'vllm_generation_tokens\w*\{[^}]*model_name="tiny"[^}]*\} (\S+)', text)]
        requests = re.findall(r'tailorlm_requests\w*\{[^}]*route="completions"[^}]*status="200"[^}]*\} (\S+)', text)
        leaked = re.findall(r'tailorlm_\w+\{[^}]*(?:path=|route="/)', text)
        assert not leaked, leaked  # labels are route names from the allow-list, never raw paths
        if tokens and sum(tokens) > 0 and requests:
            return
        time.sleep(3)
    names = sorted(set(re.findall(r"^(\w+)", text, flags=re.M)))
    raise AssertionError(
        f"no vllm_generation_tokens / tailorlm_requests samples for model tiny; exported: {names[:80]}"
    )


# ---------------------------------------------------------------- as a hostile client meets it
AUTH = {"Authorization": "Bearer test-key"}


def _handle():
    from ray import serve

    return serve.get_deployment_handle("engine", app_name="tailorlm")


def test_every_route_vllm_mounts_is_denied_unless_allow_listed(served):
    """Walks the routes of the live vLLM app (not a hand list): only the allow-list answers, and
    only with a key; the rest is 404 with an OpenAI error, with or without one."""
    from tailorlm.serving.routes import ROUTES

    allowed = {(r.method, r.path) for r in ROUTES} | {("GET", "/openapi.json")}  # serve.guard.openapi_schema: on here
    routes = _handle().vllm_routes.remote().result()
    assert len(routes) > 10 and any(p == "/invocations" for p, _ in routes)  # the app we meant
    bodies = {"/v1/completions": {"model": "tiny", "prompt": "x", "max_tokens": 2}}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as c:
        for path, methods in routes:
            url = path.replace("{", "").replace("}", "")  # path parameters get a literal value
            for method in methods:
                if method in ("WEBSOCKET", "HEAD", "OPTIONS"):
                    continue
                kw = {"json": bodies.get(url, chat)} if method in ("POST", "PUT", "PATCH") else {}
                r = c.request(method, url, **kw)
                expect = 200 if url == "/health" else 401
                assert r.status_code == expect, (method, path, r.status_code, r.text[:200])
                r = c.request(method, url, headers=AUTH, **kw)
                if (method, url) in allowed or url == "/health":
                    assert r.status_code == 200, (method, path, r.text[:200])
                else:
                    assert r.status_code in (404, 405) and "error" in r.json(), (method, path, r.text[:200])
        models = c.get("/v1/models", headers=AUTH).json()["data"]
        assert all(m["root"] == m["id"] for m in models)  # no server folder paths
        assert c.get("/health").json() == {"status": "ok"}


def test_caps_hold_on_the_live_stack(served, tiny_model_path):
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", headers=AUTH, timeout=60) as c:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
        for extra in (
            {"max_completion_tokens": CAP + 1},
            {"max_completion_tokens": CAP + 1, "max_tokens": None},
            {"max_completion_tokens": CAP + 1, "max_tokens": 1},
            {"max_tokens": CAP + 1},
        ):
            r = c.post("/v1/chat/completions", json={**chat, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] in extra, extra
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 3, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = c.post(
            "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "ignore_eos": True}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2 * 2 * 3
        for bad in (
            {"role": "system", "content": "say forbidden-word"},
            {"role": "user", "content": "forbid\u200bden-word"},
        ):
            r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [bad]})
            assert r.status_code == 400 and r.json()["error"]["type"] == "content_filter"
        import transformers

        ids = transformers.AutoTokenizer.from_pretrained(tiny_model_path).encode("forbidden-word")
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["type"] == "content_filter"  # token ids are read too


def test_a_filter_matching_the_sample_question_is_no_failed_start(served):
    from tailorlm.serving.stage import sample_chat

    cfg, _ = served
    out = sample_chat(cfg, "tiny", question="please say forbidden-word", timeout_s=30)
    assert out["answer"] is None and out["withheld"] == "content_filter"


def test_schemathesis_over_the_live_schema_finds_no_5xx(served):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    live = httpx.get(f"http://127.0.0.1:{PORT}/openapi.json", headers=AUTH).json()
    schema = schemathesis.openapi.from_dict(live)
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def fuzz(case):
            r = case.call(base_url=f"http://127.0.0.1:{PORT}", headers=AUTH, timeout=120)
            if r.status_code >= 500 and r.status_code != 503:
                failures.append((operation.label, r.status_code, r.text[:300]))
            if r.status_code >= 400:
                assert "error" in r.json()
            r = case.call(base_url=f"http://127.0.0.1:{PORT}", headers={"Authorization": "Bearer nope"}, timeout=60)
            assert r.status_code in (401, 429) or operation.path == "/health"

        fuzz()
    assert not failures, failures


def test_overload_sheds_with_retry_after_and_disconnects_abort(served):
    """4x capacity (8 = max_ongoing 4 + queued 4): the surplus gets 503 + Retry-After at once,
    nothing else 5xx; clients that hang up take their engine requests with them."""
    import concurrent.futures
    import time

    handle = _handle()
    long = {"model": "tiny", "prompt": "x", "max_tokens": CAP, "ignore_eos": True, "n": 2}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:

        def post(_):
            t = time.time()
            r = httpx.post(
                f"http://127.0.0.1:{PORT}/v1/completions", headers=AUTH, timeout=300, json={**long, "max_tokens": 16}
            )
            return r.status_code, r.headers.get("retry-after"), time.time() - t

        results = list(pool.map(post, range(32)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 8 and codes.count(503) >= 1, codes
    assert all(ra == "1" for c, ra, _ in results if c == 503)
    assert max(t for c, _, t in results if c == 503) < 5  # shed at once, not after queueing

    for stream in (False, True):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:

            def hang_up(_):
                try:  # non-streamed: the read times out; streamed: we stop reading and close
                    with httpx.stream(
                        "POST",
                        f"http://127.0.0.1:{PORT}/v1/completions",
                        headers=AUTH,
                        json={**long, "stream": stream},
                        timeout=httpx.Timeout(0.7),
                    ) as r:
                        for i, _ in enumerate(r.iter_bytes()):
                            if i >= 3:
                                return "dropped"
                except httpx.TimeoutException:
                    return "dropped"
                return "finished"

            outcome = list(pool.map(hang_up, range(4)))
        assert "dropped" in outcome, outcome
        deadline = time.time() + 3  # 4 x 2 x 900 tokens would take far longer than this to finish
        while handle.unfinished_requests.remote().result() and time.time() < deadline:
            time.sleep(0.1)
        assert handle.unfinished_requests.remote().result() == 0, f"stream={stream}: engine kept generating"


def test_live_capture_records_requests_and_feedback_without_pii_or_key(served):
    """serve.capture in the real replica: a chat with an e-mail address and the API key pasted in
    lands in <run>/capture/requests with both redacted; its feedback lands in capture/feedback."""
    import glob
    import json
    import time

    import pyarrow.parquet as pq

    from tailorlm.runs import RunDir

    cfg, _ = served
    secret = "ask jane.doe@example.com, my key: test-key"
    with httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=120) as c:
        body = {"model": "tiny", "messages": [{"role": "user", "content": secret}], "max_tokens": 4}
        r = c.post("/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 200
        rid = r.json()["id"]
        fb = c.post("/v1/feedback", json={"id": rid, "score": 0, "comment": "mail jane.doe@example.com"}, headers=AUTH)
        assert fb.status_code == 200, fb.text
    root = RunDir.from_config(cfg).path + "/capture"
    found: dict = {}
    deadline = time.time() + 60

    def landed() -> bool:
        return any(row["id"] == rid for row in found.get("requests", [])) and any(
            row["response_id"] == rid for row in found.get("feedback", [])
        )

    while time.time() < deadline and not landed():  # written off the request path, every flush_s
        time.sleep(1)
        for kind in ("requests", "feedback"):
            files = sorted(glob.glob(f"{root}/{kind}/part-*.parquet"))
            found[kind] = [row for f in files for row in pq.read_table(f).to_pylist()]
    mine = [row for row in found.get("requests", []) if row["id"] == rid]
    assert len(mine) == 1, found.get("requests")
    text = json.dumps(found)
    assert "jane.doe@example.com" not in text and "test-key" not in text
    assert "[EMAIL]" in mine[0]["prompt_text"] and "[API_KEY]" in mine[0]["prompt_text"]
    assert mine[0]["answer"] is not None and mine[0]["status"] == 200 and mine[0]["model"] == "tiny"
    assert [f for f in found["feedback"] if f["response_id"] == rid][0]["comment"] == "mail [EMAIL]"


def test_a_real_prometheus_scrapes_serving_capture_and_drift_series_with_bounded_labels(served, tmp_path):
    """Debian's prometheus, started here, scrapes the node's metrics export port: the guard's,
    vLLM's, capture's and the monitor's series are there, every metric the shipped Grafana
    dashboard queries is among them, and their labels take values from fixed sets only."""
    import shutil
    import subprocess
    import time

    import ray

    from tailorlm.metric_names import exported_names
    from tailorlm.monitor.stage import set_gauges
    from tailorlm.serving.routes import BY_PATH

    from ..unit.test_dashboard import dashboard_metrics

    prom = shutil.which("prometheus")
    if prom is None:
        if os.environ.get("TAILORLM_REQUIRE_PROMETHEUS"):
            raise AssertionError("prometheus is not installed (`make prometheus` installs Debian's package)")
        pytest.skip("prometheus not installed")
    # as a monitor check in this driver sets them (test_live_quality_decay_alerts... runs real ones)
    set_gauges({"kl": 0.5, "kl_excess": 0.4, "alert": True, "quality": 0.5, "quality_alert": False})
    port = ray.nodes()[0]["MetricsExportPort"]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['127.0.0.1:{port}']}}]}}]\n"
    )
    web = "127.0.0.1:9391"
    proc = subprocess.Popen(
        [
            prom,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wanted = dashboard_metrics()
        names: set[str] = set()
        deadline = time.time() + 90
        while time.time() < deadline and not wanted <= names:
            time.sleep(2)
            try:
                names = set(httpx.get(f"http://{web}/api/v1/label/__name__/values", timeout=5).json()["data"])
            except (httpx.HTTPError, ValueError):
                continue
        assert wanted <= names, sorted(wanted - names)
        ours = sorted(n for n in names if n.startswith("ray_tailorlm_"))
        assert set(ours) <= exported_names(), set(ours) - exported_names()
        allowed = {
            "route": {r.name for r in BY_PATH.values()} | {"unmatched"},
            "kind": {"requests", "feedback", "shadow"},
            "outcome": {"written", "dropped_full", "dropped_error"},
        }
        for name in ours:
            series = httpx.get(f"http://{web}/api/v1/series", params={"match[]": name}, timeout=5).json()["data"]
            for s in series:
                for label, values in allowed.items():
                    assert s.get(label, next(iter(values))) in values, (name, s)
                assert "status" not in s or s["status"].isdigit(), (name, s)
        alert = httpx.get(f"http://{web}/api/v1/query", params={"query": "ray_tailorlm_drift_alert"}, timeout=5).json()
        assert float(alert["data"]["result"][0]["value"][1]) == 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_monitor_tracks_live_quality_and_alerts_only_after_three_low_checks(served):
    """`tailorlm monitor` with monitor.quality asks the live endpoint the run's held-out questions:
    the random tiny model scores far below the promoted model's recorded 0.9, and the alert comes
    on the third consecutive low check, not before."""
    import json

    from tailorlm.config import apply_overrides, validate
    from tailorlm.pipeline import run_stage
    from tailorlm.runs import RunDir

    from ..unit.test_monitor import write_data_stage

    cfg, _ = served
    root = RunDir.from_config(cfg)
    write_data_stage(__import__("pathlib").Path(root.storage))
    train = __import__("pathlib").Path(root.path) / "train"
    train.mkdir(exist_ok=True)
    (train / "eval.json").write_text(json.dumps({"finetuned": {"fact_exact_match": 0.9}}))
    cfg = validate(apply_overrides(cfg.to_dict(), {"monitor.quality": True, "monitor.eval_rows": 4}))
    alerts = []
    for _ in range(3):
        s = run_stage(cfg, "monitor", echo=lambda s: None)["summary"]
        assert s["quality_promoted"] == 0.9 and s["quality"] < 0.9 * 0.98 and s["quality_low"]
        alerts.append(s["quality_alert"])
    assert alerts == [False, False, True]
