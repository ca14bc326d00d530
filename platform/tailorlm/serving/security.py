"""The guard in front of the OpenAI endpoints: API keys, per-key rate limits, size and max_tokens
caps, prompt and response filters, an A/B split between hosted models, OpenAI-style errors,
Prometheus metrics.

A plain ASGI middleware (no framework), so it wraps Ray Serve LLM's FastAPI ingress unchanged.
Keys are compared in constant time and never logged: logs and metrics name a key by a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PUBLIC_PATHS = {"/health", "/-/healthz", "/-/routes"}
OPENAI_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                      "rate_limit_error", "server_error", "content_filter"}


@dataclass
class GuardSettings:
    api_keys: list[str]
    require_key: bool
    rate_limit_per_minute: int
    max_request_bytes: int
    max_tokens_cap: int
    max_model_len: int
    blocklist: list[str] = field(default_factory=list)
    response_blocklist: list[str] = field(default_factory=list)
    ab_alias: str | None = None  # requests for this model name are split by ab_weights
    ab_weights: dict[str, float] = field(default_factory=dict)
    ab_sticky: bool = True  # one client (API key, else address) always gets the same arm

    @classmethod
    def from_config(cls, sc) -> "GuardSettings":
        keys = list(sc.api_keys) + [k.strip() for k in os.environ.get(sc.api_keys_env, "").split(",") if k.strip()]
        require = sc.require_api_key if sc.require_api_key is not None else sc.host not in LOCAL_HOSTS
        if require and not keys:
            why = "serve.require_api_key is true" if sc.require_api_key else f"host {sc.host} is beyond localhost"
            raise ValueError(f"serve: API keys are required ({why}) but none are set: export "
                             f"{sc.api_keys_env}=key1,key2 or set serve.api_keys")
        return cls(keys, require, sc.rate_limit_per_minute, sc.max_request_bytes, sc.max_tokens_cap,
                   sc.max_model_len, list(sc.blocklist), list(sc.response_blocklist),
                   sc.model_id if sc.ab_split else None, dict(sc.ab_split), sc.ab_sticky)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class TokenBucket:
    """Per-client token bucket: `rate` requests per minute, bursts up to `rate`."""

    def __init__(self, per_minute: int):
        self.rate, self.state = per_minute / 60.0, {}
        self.capacity = float(per_minute)

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        tokens, last = self.state.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1:
            self.state[client] = (tokens, now)
            return False
        self.state[client] = (tokens - 1, now)
        return True


def error_body(status: int, message: str, etype: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": etype, "param": param, "code": code or status}}).encode()


def _prompt_text(body: dict[str, Any]) -> str:
    parts = []
    prompt = body.get("prompt")
    parts += prompt if isinstance(prompt, list) else [prompt]
    for m in body.get("messages") or []:
        c = m.get("content") if isinstance(m, dict) else None
        parts += [x.get("text", "") for x in c if isinstance(x, dict)] if isinstance(c, list) else [c]
    return "\n".join(p for p in parts if isinstance(p, str))


def check_body(body: Any, s: GuardSettings) -> tuple[int, str, str, str | None] | None:
    """None if the request may pass, else (status, message, type, param)."""
    if not isinstance(body, dict):
        return 400, "request body must be a JSON object", "invalid_request_error", None
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        return 400, f"max_tokens must be a positive integer, got {mt!r}", "invalid_request_error", "max_tokens"
    if mt is not None and mt > s.max_tokens_cap:
        return 400, f"max_tokens {mt} exceeds this server's cap of {s.max_tokens_cap}", "invalid_request_error", \
            "max_tokens"
    if "messages" in body and not isinstance(body["messages"], list):
        return 400, "messages must be a list of {role, content}", "invalid_request_error", "messages"
    text = _prompt_text(body)
    if len(text) > 8 * s.max_model_len:  # cheap bound before tokenizing: no tokenizer yields < 1/8 char
        return 400, f"prompt is longer than the context of {s.max_model_len} tokens", "invalid_request_error", \
            "messages" if "messages" in body else "prompt"
    for pattern in s.blocklist:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return 400, "the prompt was rejected by this server's content filter", "content_filter", None
    return None


def ab_arm(weights: dict[str, float], draw: float) -> str:
    """The model whose cumulative weight share first exceeds draw (0 <= draw < 1)."""
    total, acc = sum(weights.values()), 0.0
    for model, w in sorted(weights.items()):
        acc += w / total
        if draw < acc:
            return model
    return max(sorted(weights))


def _response_text(body: dict[str, Any]) -> str:
    parts = []
    for ch in body.get("choices") or []:
        if not isinstance(ch, dict):
            continue
        parts.append(ch.get("text") or "")
        for k in ("message", "delta"):
            if isinstance(ch.get(k), dict):
                parts.append(ch[k].get("content") or "")
    return "".join(p for p in parts if isinstance(p, str))


class ResponseFilter:
    """Checks generated text against the response blocklist. Non-streaming: a match replaces the
    answer with an OpenAI content_filter error (400). Streaming: text accumulates over the SSE
    events; at a match the event is withheld and the stream ends with a content_filter error
    event and `data: [DONE]` (what was already sent stays sent)."""

    def __init__(self, patterns: list[str]):
        self.patterns = [re.compile(p, flags=re.IGNORECASE) for p in patterns]
        self.seen, self.buffer, self.blocked = "", b"", False

    def hit(self, text: str) -> bool:
        return any(p.search(text) for p in self.patterns)

    def stream_chunk(self, data: bytes) -> bytes:
        """Filtered bytes to pass on for one body chunk of an SSE stream."""
        if self.blocked:
            return b""
        self.buffer += data
        out = b""
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            payload = event[5:].strip() if event.startswith(b"data:") else b""
            if payload and payload != b"[DONE]":
                try:
                    self.seen += _response_text(json.loads(payload))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
                if self.hit(self.seen):
                    self.blocked = True
                    err = error_body(400, "the response was stopped by this server's content filter",
                                     "content_filter")
                    return out + b"data: " + err + b"\n\ndata: [DONE]\n\n"
            out += event + b"\n\n"
        return out


class Guard:
    """ASGI middleware applying GuardSettings to every /v1 request."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: GuardSettings):
        self.app, self.s = app, settings
        self.limiter = TokenBucket(settings.rate_limit_per_minute)
        self.metrics = _Metrics()
        self._draws = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status_box = {"status": 500}
        held: dict[str, Any] = {}

        async def send_tracked(message):
            # error responses are held back until complete, so that a body in another shape
            # (FastAPI's {"detail": ...}) can be rewritten into an OpenAI error object
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                if message["status"] >= 400:
                    held.update(start=message, body=b"")
                    return
            elif held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                return await _reply(send, held["start"]["status"], openai_error(held["start"]["status"], held["body"]))
            await send(message)

        try:
            await self._handle(scope, receive, send_tracked)
        finally:
            self.metrics.observe(scope["path"], status_box["status"], time.monotonic() - start)

    async def _handle(self, scope, receive, send):
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        client = (scope.get("client") or ("unknown", 0))[0]
        if self.s.require_key or self.s.api_keys:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(token, k) for k in self.s.api_keys):
                if self.s.require_key or token:
                    return await _reply(send, 401, error_body(401, "invalid or missing API key (send "
                                        "'Authorization: Bearer <key>')", "authentication_error",
                                                              code="invalid_api_key"))
            else:
                client = "key:" + key_id(token)
        if not self.limiter.allow(client):
            return await _reply(send, 429, error_body(429, f"rate limit of {self.s.rate_limit_per_minute} requests "
                                "per minute exceeded", "rate_limit_error", code="rate_limit_exceeded"),
                                extra=[(b"retry-after", b"1")])
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = int(headers.get("content-length") or 0)
        if length > self.s.max_request_bytes:
            return await _reply(send, 413, error_body(413, f"request body of {length} bytes exceeds the "
                                f"{self.s.max_request_bytes}-byte cap", "invalid_request_error"))
        chunks, size = [], 0
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.s.max_request_bytes:
                return await _reply(send, 413, error_body(413, f"request body exceeds the "
                                    f"{self.s.max_request_bytes}-byte cap", "invalid_request_error"))
            if not msg.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return await _reply(send, 400, error_body(400, f"request body is not valid JSON: {exc}",
                                                      "invalid_request_error"))
        problem = check_body(body, self.s)
        if problem:
            status, message, etype, param = problem
            return await _reply(send, status, error_body(status, message, etype, param))
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = self.s.max_tokens_cap  # an uncapped request would run to the context end
            raw = json.dumps(body).encode()
        if self.s.ab_weights and body.get("model") == self.s.ab_alias:
            if self.s.ab_sticky:  # a stable hash of the client: the same arm on every request
                draw = int(hashlib.sha256(client.encode()).hexdigest()[:12], 16) / 16**12
            else:  # a low-discrepancy sequence: the split matches the weights closely at any volume
                self._draws += 1
                draw = (self._draws * 0.6180339887498949) % 1.0
            body["model"] = ab_arm(self.s.ab_weights, draw)
            raw = json.dumps(body).encode()
        if self.s.response_blocklist:
            send = self._filtered_send(send, ResponseFilter(self.s.response_blocklist), bool(body.get("stream")))
        new_headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        new_headers.append((b"content-length", str(len(raw)).encode()))
        await self.app({**scope, "headers": new_headers}, replay(raw, receive), send)


    @staticmethod
    def _filtered_send(send, flt: ResponseFilter, stream: bool):
        held: dict[str, Any] = {}

        async def filtered(message):
            if message["type"] == "http.response.start":
                if message["status"] >= 400:
                    return await send(message)
                held["start"], held["body"] = message, b""
                return None
            if message["type"] != "http.response.body" or "start" not in held:
                return await send(message)
            more = message.get("more_body", False)
            if stream:  # pass events on as they come, minus a blocked tail
                if not held.get("started"):
                    held["started"] = True
                    await send(held["start"])
                return await send({**message, "body": flt.stream_chunk(message.get("body", b""))})
            held["body"] += message.get("body", b"")
            if more:
                return None
            try:
                text = _response_text(json.loads(held["body"]))
            except (json.JSONDecodeError, UnicodeDecodeError):
                text = ""
            if flt.hit(text):
                return await _reply(send, 400, error_body(400, "the response was rejected by this server's "
                                                          "content filter", "content_filter"))
            headers = [(k, v) for k, v in held["start"]["headers"] if k.lower() != b"content-length"]
            await send({**held["start"], "headers": headers + [(b"content-length", str(len(held["body"])).encode())]})
            await send({"type": "http.response.body", "body": held["body"]})

        return filtered


def replay(body: bytes, receive):
    """An ASGI receive that hands the app a body already read, then defers to the real one
    (which reports a client disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


def openai_error(status: int, body: bytes) -> bytes:
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = body.decode(errors="replace")
    etype = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        err = parsed["error"]
        if err.get("type") in OPENAI_ERROR_TYPES:
            return body
        # vLLM names errors after exception classes ("NotFoundError"); clients expect OpenAI's types
        return json.dumps({"error": {**err, "type": etype}}).encode()
    detail = parsed.get("detail", parsed) if isinstance(parsed, dict) else parsed
    return error_body(status, detail if isinstance(detail, str) else json.dumps(detail), etype)


async def _reply(send, status: int, body: bytes, extra: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


class _Metrics:
    """Requests, latency and errors as Prometheus metrics, exported by Ray's metrics endpoint."""

    def __init__(self) -> None:
        try:
            from ray.util.metrics import Counter, Histogram

            self.requests = Counter("tailorlm_requests", "HTTP requests by path and status",
                                    tag_keys=("path", "status"))
            self.errors = Counter("tailorlm_errors", "HTTP 4xx/5xx responses", tag_keys=("path", "status"))
            self.latency = Histogram("tailorlm_request_latency_s", "request latency in seconds",
                                     boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=("path",))
        except Exception:  # outside a Ray worker (unit tests): count nothing
            self.requests = self.errors = self.latency = None

    def observe(self, path: str, status: int, seconds: float) -> None:
        if self.requests is None:
            return
        tags = {"path": path, "status": str(status)}
        self.requests.inc(tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(seconds, tags={"path": path})
