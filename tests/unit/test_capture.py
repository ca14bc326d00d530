"""serve.capture on a stand-in OpenAI app: what is recorded, what never is (PII, API keys), and a
store that fails or fills never fails a request."""

import json
import string

import httpx
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailorlm.config import load_config
from tailorlm.serving import keys
from tailorlm.serving.capture import FEEDBACK, REQUESTS, CaptureWriter, parse_response
from tailorlm.serving.security import Guard, GuardSettings

KEY = "sk-test-0123456789abcdefXYZ"
EMAIL, PHONE, CARD = "jane.doe@example.com", "+1 415 555 0132", "4111 1111 1111 1111"
ANSWER = f"Write to {EMAIL} or call {PHONE}."


async def chat_app(scope, receive, send):
    """Stands in for vLLM: a chat answer holding PII, streamed when asked."""
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    req = json.loads(body)
    if req.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i, piece in enumerate([ANSWER[:10], ANSWER[10:]]):
            event = {"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"content": piece}}]}
            await send(
                {"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True}
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        return
    out = {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16},
    }
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(out).encode()})


def guard(tmp_path, *overrides, uri=None):
    sc = load_config(None, ["serve.host=0.0.0.0", "serve.capture.enabled=true", *overrides]).serve
    s = GuardSettings.from_config(
        sc, capture_uri=uri or str(tmp_path / "capture"), pii_kinds=["email", "phone", "credit_card"], version="1.0.0"
    )
    return Guard(chat_app, s)


def rows(tmp_path, kind) -> list[dict]:
    files = sorted((tmp_path / "capture" / kind).glob("part-*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TAILORLM_API_KEYS", KEY)


def chat(content: str, **extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], **extra}


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.anyio
async def test_requests_are_recorded_with_no_pii_and_no_key(tmp_path):
    g = guard(tmp_path)
    prompt = f"My card is {CARD}, mail {EMAIL}; my key is {KEY}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=g), base_url="http://t") as c:
        r1 = await c.post("/v1/chat/completions", json=chat(prompt), headers=AUTH)
        r2 = await c.post("/v1/chat/completions", json=chat(prompt, stream=True), headers=AUTH)
    assert r1.status_code == r2.status_code == 200 and EMAIL in r1.json()["choices"][0]["message"]["content"]
    await g.capture.drain()
    got = rows(tmp_path, REQUESTS)
    assert len(got) == 2
    text = json.dumps(got)
    for secret in (KEY, EMAIL, PHONE, CARD, "4111"):
        assert secret not in text, secret
    plain, streamed = sorted(got, key=lambda r: r["stream"])
    assert plain["id"] == "chatcmpl-1" and streamed["id"] == "chatcmpl-s1"
    assert plain["answer"] == streamed["answer"] == "Write to [EMAIL] or call [PHONE]."
    assert plain["completion_tokens"] == 9 and plain["status"] == 200 and plain["version"] == "1.0.0"
    assert plain["key_hash"] == keys.key_id(keys.digest(KEY)) and plain["route"] == "chat_completions"
    assert "[API_KEY]" in plain["prompt_text"] and json.loads(plain["messages"])[0]["role"] == "user"
    # prompt_text and messages both hold the prompt: its secrets count in each
    assert json.loads(plain["redacted"]) == {"api_key": 2, "credit_card": 2, "email": 3, "phone": 1}
    assert not list((tmp_path / "capture" / REQUESTS).glob("_*"))  # no half-written file left


@pytest.mark.anyio
async def test_a_failing_or_full_store_never_fails_a_request(tmp_path):
    (tmp_path / "blocker").write_text("a file where the capture folder should be")
    g = guard(tmp_path, uri=str(tmp_path / "blocker" / "capture"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=g), base_url="http://t") as c:
        for _ in range(3):
            assert (await c.post("/v1/chat/completions", json=chat("hi"), headers=AUTH)).status_code == 200
    await g.capture.drain()
    assert g.capture.counts == {(REQUESTS, "dropped_error"): 3}

    full = guard(tmp_path, "serve.capture.queue_rows=2")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=full), base_url="http://t") as c:
        for _ in range(5):
            assert (await c.post("/v1/chat/completions", json=chat("hi"), headers=AUTH)).status_code == 200
    assert full.capture.counts[(REQUESTS, "dropped_full")] == 3
    await full.capture.drain()
    assert len(rows(tmp_path, REQUESTS)) == 2


@pytest.mark.anyio
async def test_sample_rate_zero_records_nothing(tmp_path):
    g = guard(tmp_path, "serve.capture.sample_rate=0")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=g), base_url="http://t") as c:
        assert (await c.post("/v1/chat/completions", json=chat("hi"), headers=AUTH)).status_code == 200
    assert await g.capture.drain() == 0 and not rows(tmp_path, REQUESTS)


@pytest.mark.anyio
async def test_feedback_is_guarded_validated_and_recorded(tmp_path):
    g = guard(tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=g), base_url="http://t") as c:
        body = {"id": "chatcmpl-1", "score": 1, "comment": f"wrong, ask {EMAIL}"}
        assert (await c.post("/v1/feedback", json=body)).status_code == 401  # no key: refused like any route
        bad = await c.post("/v1/feedback", json={"id": "chatcmpl-1", "score": "good"}, headers=AUTH)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
        assert (await c.post("/v1/feedback", json={**body, "extra": 1}, headers=AUTH)).status_code == 400
        assert (await c.get("/v1/feedback", headers=AUTH)).status_code == 405
        ok = await c.post("/v1/feedback", json=body, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["id"].startswith("fb-")
    await g.capture.drain()
    (fb,) = rows(tmp_path, FEEDBACK)
    assert fb["response_id"] == "chatcmpl-1" and fb["score"] == 1.0 and fb["comment"] == "wrong, ask [EMAIL]"

    off = Guard(chat_app, GuardSettings.from_config(load_config(None, ["serve.host=0.0.0.0"]).serve))
    assert off.capture is None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off), base_url="http://t") as c:
        r = await c.post("/v1/feedback", json=body, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_capture"


def test_parse_response_of_garbage_is_empty_not_an_error():
    assert parse_response(b"", False) == (None, None, None)
    assert parse_response(b"{not json", False) == (None, None, None)
    assert parse_response(b"data: [1, 2]\n\n", True) == (None, None, None)


words = st.text(alphabet=string.ascii_letters + " .,;:!?", max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.tuples(words, st.sampled_from(["", EMAIL, KEY, CARD, PHONE]), words, st.sampled_from([" ", "=", ":", '"'])),
        min_size=1,
        max_size=12,
    ),
    batch=st.integers(1, 5),
)
def test_property_every_offered_row_is_written_once_and_clean(tmp_path_factory, texts, batch):
    """Any texts with PII or the key planted anywhere: every row offered is written exactly once,
    in order, whatever the batch size (rotation), and no planted secret survives."""
    root = tmp_path_factory.mktemp("cap")
    cc = load_config(None, [f"serve.capture.batch_rows={batch}"]).serve.capture
    w = CaptureWriter(str(root), cc, ["email", "phone", "credit_card"], [keys.digest(KEY)])
    for i, (a, secret, b, glue) in enumerate(texts):  # glued by punctuation: "key=sk-..."
        assert w.offer(REQUESTS, {"time": float(i), "prompt_text": f"{a} {glue}{secret}{glue} {b}", "_response": b""})
    assert w.flush_sync() == len(texts)
    files = sorted((root / REQUESTS).glob("part-*.parquet"))
    got = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert len(files) == -(-len(texts) // batch)
    assert sorted(r["time"] for r in got) == [float(i) for i in range(len(texts))]
    for r in got:
        for secret in (EMAIL, KEY, CARD, PHONE):
            assert secret not in r["prompt_text"]


async def model_app(scope, receive, send):
    """Answers with the model it was asked for, after a pause (so shadows overlap live requests)."""
    import asyncio

    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    req = json.loads(body)
    await asyncio.sleep(0.01)
    out = {
        "id": f"chatcmpl-{req['model']}-{req['messages'][0]['content']}",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"from {req['model']}"}}],
    }
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(out).encode()})


@pytest.mark.anyio
async def test_shadow_gets_a_share_of_requests_and_its_answers_are_recorded_never_returned(tmp_path):
    import asyncio

    sc = load_config(
        None,
        ["serve.host=0.0.0.0", "serve.capture.enabled=true", "serve.shadow.version=1.1.0", "serve.shadow.share=0.5"],
    ).serve
    g = Guard(model_app, GuardSettings.from_config(sc, capture_uri=str(tmp_path / "capture"), version="1.0.0"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=g), base_url="http://t") as c:
        answers = [
            (await c.post("/v1/chat/completions", json=chat(str(i)), headers=AUTH)).json()["choices"][0]["message"][
                "content"
            ]
            for i in range(20)
        ]
        other = await c.post("/v1/chat/completions", json={**chat("x"), "model": "demo-w4a16"}, headers=AUTH)
    assert set(answers) == {"from demo"} and other.status_code == 200  # the client only ever gets the live model
    while g.shadows:
        await asyncio.sleep(0.01)
    await g.capture.drain()
    shadows = rows(tmp_path, "shadow")
    live = {r["id"] for r in rows(tmp_path, REQUESTS)}
    assert len(shadows) == 10 and all(r["answer"] == "from demo-shadow" and r["live_id"] in live for r in shadows)
    assert {r["version"] for r in shadows} == {"1.1.0"} and all(r["status"] == 200 for r in shadows)
    # only requests for model_id are mirrored, and a shadow needs capture on
    with pytest.raises(ValueError, match="serve.capture.enabled"):
        load_config(None, ["serve.shadow.version=1.1.0"])


def test_review_regressions_surrogates_cut_secrets_client_fields_null_columns_cut_streams(tmp_path):
    """Found by review: a lone surrogate dropped its whole batch; a key across the max_text_chars
    cut kept its prefix; `user` was stored unredacted; an all-null column made the folder
    unreadable as one dataset; a stream cut at MAX_RESPONSE_BYTES lost its whole answer."""
    import pyarrow.dataset as pads

    cc = load_config(None, ["serve.capture.max_text_chars=100"]).serve.capture
    w = CaptureWriter(str(tmp_path), cc, ["email"], [keys.digest(KEY)])
    w.offer(REQUESTS, {"time": 0.0, "prompt_text": "bad \ud800 text", "_response": b""})
    w.offer(REQUESTS, {"time": 1.0, "prompt_text": "x" * 90 + " " + KEY, "user": EMAIL, "_response": b""})
    assert w.flush_sync() == 2
    w.offer(REQUESTS, {"time": 2.0, "prompt_text": "ok", "user": None, "_response": b""})  # user all null here
    assert w.flush_sync() == 1
    got = pads.dataset(str(tmp_path / REQUESTS), format="parquet").to_table().to_pylist()
    assert len(got) == 3 and "sk-test" not in json.dumps(got) and EMAIL not in json.dumps(got)
    event = json.dumps({"id": "c1", "choices": [{"delta": {"content": "hello"}}]})
    cut = f"data: {event}\n\ndata: {event[:20]}".encode()
    assert parse_response(cut, True)[:2] == ("c1", "hello")
