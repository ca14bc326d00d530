"""The guard in front of the OpenAI endpoints, deny by default. In order, for every request:

    IP allow-list -> /health -> API key (wrong keys throttled per address) -> route allow-list
    -> per-key request rate -> body (size, read timeout, JSON depth) -> schema -> prompt filter
    -> cost caps and per-key token budget -> in-flight capacity -> the app (response filter,
    A/B split, disconnects abort the engine request)

A plain ASGI middleware (no framework), so it wraps vLLM's app and Ray Serve LLM's FastAPI
ingress alike. Every rejection is an OpenAI-style error body with a 4xx status (503 only for
capacity), decided before vLLM sees the body. The routes and bodies it admits are in routes.py,
costs in cost.py, filters in filters.py, keys in keys.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from tailorlm.config import AbConfig, CaptureConfig, GuardConfig, ServeConfig
from tailorlm.serving import keys as api_keys
from tailorlm.serving.capture import recording_send
from tailorlm.serving.cost import TokenBucket, cap_problem, prompt_lengths, request_cost, retry_after
from tailorlm.serving.filters import Blocklist, prompt_texts
from tailorlm.serving.replies import (
    ERROR_TYPES,
    error_body,
    filtered_send,
    forwarded_scope,
    openai_errors,
    replay,
    reply,
    run_abortable,
)
from tailorlm.serving.routes import (
    BY_PATH,
    FEEDBACK,
    HEALTH,
    OPENAPI,
    ROUTES,
    BodyError,
    Route,
    openapi_schema,
    validate_body,
)

log = logging.getLogger(__name__)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class GuardSettings:
    """What the guard enforces: serve.guard as it is (minus any keys written in the config: the
    guard holds their digests only), with what it needs from the rest of serve.*."""

    guard: GuardConfig
    key_digests: list[str]
    require_key: bool
    max_model_len: int  # serve.engine.max_model_len: the context a prompt and its output must fit
    max_inflight: int  # ServeConfig.guard_capacity()
    ab: AbConfig = field(default_factory=AbConfig)
    ab_alias: str | None = None  # requests for this model name are split by ab.split
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    capture_uri: str | None = None  # <run>/capture: where serve.capture writes (None: nothing captured)
    pii_kinds: list[str] = field(default_factory=list)  # data.pii.kinds: what capture redacts
    version: str | None = None  # the registry version served, recorded with each captured request
    shadow_version: str | None = None  # serve.shadow.version as registered: hosted as shadow_id
    shadow_id: str | None = None
    shadow_share: float = 0.0
    model_id: str = "demo"

    @classmethod
    def from_config(
        cls,
        sc: ServeConfig,
        capture_uri: str | None = None,
        pii_kinds: list[str] | None = None,
        version=None,
        shadow_version=None,
    ) -> "GuardSettings":
        g = sc.guard
        keys = api_keys.read_keys(g)
        require = g.require_api_key if g.require_api_key is not None else sc.host not in LOCAL_HOSTS
        if require and not keys:
            why = "serve.guard.require_api_key is true" if g.require_api_key else f"host {sc.host} is beyond localhost"
            raise ValueError(
                f"serve: API keys are required ({why}) but none are set: export "
                f"{g.api_keys_env}=key1,key2 or set serve.guard.api_keys"
            )
        return cls(
            guard=g.model_copy(update={"api_keys": []}),
            key_digests=sorted({api_keys.digest(k) for k in keys}),
            require_key=require,
            max_model_len=sc.engine.max_model_len,
            max_inflight=sc.guard_capacity(),
            ab=sc.ab,
            ab_alias=sc.model_id if sc.ab.split else None,
            capture=sc.capture,
            capture_uri=capture_uri if sc.capture.enabled else None,
            pii_kinds=list(pii_kinds or []),
            version=version,
            shadow_version=shadow_version or sc.shadow.version,
            shadow_id=sc.shadow_id(),
            shadow_share=sc.shadow.share,
            model_id=sc.model_id,
        )


class Reject(Exception):
    """A request refused with an OpenAI-style error."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        etype: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or []
        self.etype, self.code = etype or ERROR_TYPES.get(status, "server_error"), code


def ab_arm(weights: dict[str, float], draw: float) -> str:
    """The model whose cumulative weight share first exceeds draw (0 <= draw < 1)."""
    total, acc = sum(weights.values()), 0.0
    for model, w in sorted(weights.items()):
        acc += w / total
        if draw < acc:
            return model
    return max(sorted(weights))


def client_address(scope) -> tuple[str, Any]:
    """(the name the per-address limits count under, the parsed address or None). An IPv4
    address mapped into IPv6 counts as itself; an IPv6 client as its /64, which one host can
    rotate through freely."""
    address = (scope.get("client") or ("unknown", 0))[0]
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address, None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)), ip
    return str(ip), ip


def _reject_constant(token: str):
    raise ValueError(f"{token} is not valid JSON")


def parse_json(raw: bytes, max_depth: int) -> Any:
    """json.loads that refuses NaN/Infinity, over-deep nesting and over-long numbers with a 400."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise Reject(400, f"request body nests deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError, as is a 5000-digit int
        raise Reject(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
    stack = [(body, 1)]
    while stack:  # iterative: the check itself must not recurse
        node, depth = stack.pop()
        if depth > max_depth:
            raise Reject(400, f"request body nests deeper than {max_depth} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack += [(c, depth + 1) for c in children if isinstance(c, (dict, list))]
    return body


def charge(bucket: TokenBucket, client: str, amount: float, message: str, code: str) -> None:
    """Take `amount` from the client's bucket, or refuse with 429 and when to retry."""
    wait = bucket.take(client, amount)
    if wait > 0:
        raise Reject(429, message, code=code, headers=[(b"retry-after", retry_after(wait))])


class Guard:
    """ASGI middleware applying GuardSettings. tokenizer (optional, the hosted model's): exact
    prompt token counts for the cost, the context check, and the text of token-id prompts."""

    def __init__(self, app: Callable[..., Awaitable[None]], settings: GuardSettings, tokenizer: Any = None):
        self.app, self.s, self.tokenizer = app, settings, tokenizer
        self.networks = [ipaddress.ip_network(n, strict=False) for n in settings.guard.allow_ips]
        self.requests = TokenBucket(settings.guard.rate_limit_per_minute)
        self.tokens = TokenBucket(settings.guard.tokens_per_minute)
        self.auth_failures = TokenBucket(settings.guard.auth_failures_per_minute)
        self.blocklist, self.response_blocklist = (
            Blocklist(settings.guard.blocklist),
            Blocklist(settings.guard.response_blocklist),
        )
        self.inflight, self.reading, self._draws, self._shadow_draws = 0, 0, 0, 0
        self.shadows: set[asyncio.Task] = set()  # mirrored requests running (a reference keeps each alive)
        self.metrics = _Metrics()
        self.capture = None
        if settings.capture_uri:
            from tailorlm.serving.capture import CaptureWriter

            self.capture = CaptureWriter(
                settings.capture_uri, settings.capture, settings.pii_kinds, settings.key_digests
            )

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets (vLLM's realtime routes): not part of the served surface
            return await send({"type": "websocket.close", "code": 1008})
        route = BY_PATH.get(scope["path"])
        start, status = time.monotonic(), {"code": 500, "started": False}

        version = [(b"x-tailorlm-version", self.s.version.encode())] if self.s.version else []

        async def tracked(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                if version:  # which registered version answered (a promotion switches it)
                    message = {**message, "headers": [*message.get("headers", []), *version]}
            await send(message)

        try:
            await self._handle(scope, receive, tracked, route)
        except Reject as r:
            await reply(tracked, r.status, error_body(r.status, r.message, r.etype, r.param, r.code), r.headers)
        except Exception:  # a defect of ours: one log line per request, no traceback flood, no body
            log.exception("guard: internal error on %s %s", scope.get("method"), route.name if route else "unmatched")
            if not status["started"]:
                await reply(tracked, 500, error_body(500, "internal error", "server_error"))
        finally:
            label = route.name if route is not None and route.method == scope.get("method") else "unmatched"
            self.metrics.observe(label, status["code"], time.monotonic() - start)

    async def _handle(self, scope, receive, send, route: Route | None):
        s = self.s
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        address, ip = client_address(scope)
        if self.networks and not (ip is not None and any(ip in net for net in self.networks)):
            raise Reject(403, "this client address is not allowed to use the API", code="ip_not_allowed")
        if route is HEALTH and scope["method"] == "GET":
            return await reply(send, 200, b'{"status": "ok"}')
        client = address
        if s.require_key or s.key_digests:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            wait = self.auth_failures.wait_s(address)
            if wait > 0:  # before comparing: a throttled address learns nothing about its guesses
                raise Reject(
                    429,
                    "too many failed API key attempts from this address",
                    code="auth_throttled",
                    headers=[(b"retry-after", retry_after(wait))],
                )
            matched = api_keys.matching_digest(token, s.key_digests) if token else None
            if matched is None and (s.require_key or token):
                if token:  # a wrong guess costs allowance; a missing key is no guess
                    self.auth_failures.take(address)
                raise Reject(
                    401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
                )
            client = "key:" + api_keys.key_id(matched) if matched else address
        if route is None or (route is OPENAPI and not s.guard.openapi_schema):
            raise Reject(
                404,
                f"unknown route {scope['path'][:100]!r}; this server answers " + ", ".join(r.path for r in ROUTES),
                code="unknown_route",
            )
        if scope["method"] != route.method:
            raise Reject(
                405,
                f"{route.path} takes {route.method}",
                code="method_not_allowed",
                headers=[(b"allow", route.method.encode())],
            )
        charge(
            self.requests,
            client,
            1,
            f"rate limit of {s.guard.rate_limit_per_minute} requests per minute exceeded",
            "rate_limit_exceeded",
        )
        if route is OPENAPI:
            return await reply(send, 200, json.dumps(openapi_schema()).encode())
        if route.body is None:  # GET /v1/models: no client body or headers go on
            return await self.app(forwarded_scope(scope, b""), replay(b"", receive), send)
        if self.reading + self.inflight >= s.max_inflight:
            # slow uploads count against the capacity too: they hold a connection and a Serve slot
            raise self._overloaded()
        self.reading += 1
        try:
            raw = await self._read_body(headers, receive)
        finally:
            self.reading -= 1
        parsed = parse_json(raw, s.guard.max_json_depth)
        try:
            body = validate_body(route, parsed)
        except BodyError as exc:
            raise Reject(400, str(exc), exc.param) from None
        if route is FEEDBACK:
            return await self._feedback(send, body, client)
        await self._generate(scope, receive, send, route, body, client)

    async def _feedback(self, send, body: dict[str, Any], client: str):
        if self.capture is None:
            raise Reject(
                404, "feedback is not recorded on this server (serve.capture.enabled is false)", code="no_capture"
            )
        row = {
            "id": "fb-" + uuid.uuid4().hex,
            "time": time.time(),
            "response_id": body["id"],
            "score": body["score"],
            "comment": body.get("comment"),
            "key_hash": client[4:] if client.startswith("key:") else None,
        }
        if not self.capture.offer("feedback", row):
            raise Reject(
                503,
                "feedback store is full; retry shortly",
                etype="server_error",
                code="overloaded",
                headers=[(b"retry-after", b"5")],
            )
        return await reply(send, 200, json.dumps({"object": "feedback", "id": row["id"]}).encode())

    async def _read_body(self, headers: dict[str, str], receive) -> bytes:
        cap = self.s.guard.max_request_bytes
        declared = headers.get("content-length", "0").strip() or "0"
        if not re.fullmatch(r"[0-9]{1,18}", declared):  # str.isdigit() admits "²", which int() refuses
            raise Reject(400, "content-length header is not a number")
        if int(declared) > cap:
            raise Reject(413, f"request body of {declared} bytes exceeds the {cap}-byte cap")
        chunks, size, deadline = [], 0, time.monotonic() + self.s.guard.body_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise Reject(
                    408, f"request body not received within {self.s.guard.body_timeout_s:g} s", code="request_timeout"
                ) from None
            if msg["type"] == "http.disconnect":
                raise Reject(400, "client disconnected before sending the whole body")
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                raise Reject(413, f"request body exceeds the {cap}-byte cap")
            if not msg.get("more_body"):
                return b"".join(chunks)

    def _count(self, text: str) -> int:
        if self.tokenizer is None:  # an upper bound for byte-level BPE tokenizers: at most a token a byte
            return len(text.encode("utf-8", "surrogatepass"))
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    async def _generate(self, scope, receive, send, route: Route, body: dict[str, Any], client: str):
        s = self.s
        if self.response_blocklist and (body.get("logprobs") or body.get("top_logprobs")):
            # the alternatives at each position would show the words the filter withholds
            raise Reject(400, "logprobs are not available on this server (it filters responses)", "logprobs")
        if body.get("echo") and body.get("logprobs") is not None:
            raise Reject(400, "echo with logprobs (prompt logprobs) is not supported by this server", "echo")
        prompt = body.get("prompt")
        if self.tokenizer is not None and isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
            vocab = len(self.tokenizer)
            for ids in [prompt] if isinstance(prompt[0], int) else prompt:
                if max(ids) >= vocab:
                    raise Reject(400, f"token id {max(ids)} is outside the vocabulary of {vocab}", "prompt")
        texts = prompt_texts(body, self._detokenize)  # once: for the length bound and the filter
        if sum(map(len, texts)) > 8 * s.max_model_len * s.guard.max_prompts:  # before normalizing or tokenizing it
            raise Reject(
                400,
                f"prompt text is longer than {s.guard.max_prompts} prompts of {s.max_model_len} tokens",
                "messages" if "messages" in body else "prompt",
            )
        if self.blocklist and any(self.blocklist.hit(t) for t in texts):
            raise Reject(
                400,
                "the prompt was rejected by this server's content filter",
                etype="content_filter",
                code="content_filter",
            )
        exact, lengths = self.tokenizer is not None, prompt_lengths(body, self._count)
        default_output = s.guard.max_tokens_cap
        if exact and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            # what vLLM does unasked (the rest of the context), within the cap: written into the body below
            default_output = max(1, min(s.guard.max_tokens_cap, s.max_model_len - max(lengths)))
        cost = request_cost(body, default_output, lengths)
        problem = cap_problem(cost, body, s, exact)
        if problem:
            raise Reject(400, *problem)
        charge(
            self.tokens,
            client,
            cost.total,
            f"token budget of {s.guard.tokens_per_minute} per minute exceeded (this request may cost {cost.total})",
            "token_rate_limit_exceeded",
        )
        if self.inflight >= s.max_inflight:
            raise self._overloaded()
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = default_output  # an uncapped request would run to the context end
        mirror = self._mirrors(body)  # decided on what the client asked, before the A/B split renames it
        if s.ab.split and body.get("model") == s.ab_alias:
            body["model"] = ab_arm(s.ab.split, self._draw(client))
        raw = json.dumps(body).encode()
        out = openai_errors(send)
        record = mirror or (self.capture is not None and self.capture.sampled())  # a mirror needs the live id
        if record:  # what the client is sent: after the response filter, before error rewriting
            sink: dict[str, Any] = {}
            out = recording_send(out, sink)
        if self.response_blocklist:
            out = filtered_send(out, self.response_blocklist, bool(body.get("stream")))
        self.inflight += 1
        t0, wall0 = time.monotonic(), time.time()
        try:
            await run_abortable(self.app, forwarded_scope(scope, raw), raw, receive, out)
        finally:
            self.inflight -= 1
            if record:  # queued as it is: parsing and redaction happen in the capture writer's thread
                self.capture.offer(
                    "requests",
                    {
                        "time": wall0,
                        "route": route.name,
                        "model": body.get("model"),
                        "version": s.version,
                        "stream": bool(body.get("stream")),
                        "status": sink["status"],
                        "latency_s": time.monotonic() - t0,
                        "prompt_tokens": sum(lengths),
                        "prompt_text": "\n".join(texts),
                        "messages": body.get("messages"),
                        "key_hash": client[4:] if client.startswith("key:") else None,
                        "user": body.get("user"),  # the client's own label (the monitor marks its probes)
                        "_response": bytes(sink["body"]),
                    },
                )
            if mirror and sink["status"] == 200:
                task = asyncio.get_running_loop().create_task(self._shadow(scope, body, bytes(sink["body"])))
                self.shadows.add(task)
                task.add_done_callback(self.shadows.discard)

    def _mirrors(self, body: dict[str, Any]) -> bool:
        """Whether this request is copied to the shadow: serve.shadow.share of those for model_id,
        by a low-discrepancy sequence, and only while the engines have room (a shadow never
        takes capacity live requests need)."""
        s = self.s
        if not s.shadow_id or self.capture is None or body.get("model") != s.model_id:
            return False
        if self.inflight + len(self.shadows) >= s.max_inflight // 2:
            return False
        self._shadow_draws += 1
        return (self._shadow_draws * 0.6180339887498949) % 1.0 < s.shadow_share

    async def _shadow(self, scope, body: dict[str, Any], live_response: bytes) -> None:
        """The request again, to the shadow model, after the live answer went out; its answer is
        recorded (capture kind "shadow", joined to the live one by live_id), never sent."""
        from tailorlm.serving.capture import SHADOW, parse_response

        mirrored = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        mirrored["model"] = self.s.shadow_id
        raw = json.dumps(mirrored).encode()
        sink: dict[str, Any] = {}

        async def nowhere(message):  # the shadow's answer goes to the record only
            pass

        async def no_disconnect():  # nobody hangs up on a shadow: wait until the app stops listening
            await asyncio.Event().wait()

        t0, wall0 = time.monotonic(), time.time()
        try:
            await self.app(forwarded_scope(scope, raw), replay(raw, no_disconnect), recording_send(nowhere, sink))
        except Exception as exc:  # a shadow failure is the candidate's record, never the client's problem
            sink.update(status=599, body=bytearray(str(exc)[:200].encode()))
        live_id, _, _ = parse_response(live_response, bool(body.get("stream")))
        self.capture.offer(
            SHADOW,
            {
                "time": wall0,
                "live_id": live_id,
                "model": self.s.shadow_id,
                "version": self.s.shadow_version,
                "status": sink.get("status"),
                "latency_s": time.monotonic() - t0,
                "stream": False,
                "_response": bytes(sink.get("body") or b""),
            },
        )

    def _overloaded(self) -> Reject:
        return Reject(
            503,
            f"server at capacity ({self.s.max_inflight} requests in flight); retry shortly",
            etype="server_error",
            code="overloaded",
            headers=[(b"retry-after", b"1")],
        )

    def _draw(self, client: str) -> float:
        if self.s.ab.sticky:  # a stable hash of the client: the same arm on every request
            return int(hashlib.sha256(client.encode()).hexdigest()[:12], 16) / 16**12
        self._draws += 1  # a low-discrepancy sequence: the split matches the weights closely at any volume
        return (self._draws * 0.6180339887498949) % 1.0


class _Metrics:
    """Requests, latency and errors as Prometheus metrics, exported by Ray's metrics endpoint.
    Labelled by the allow-listed route's name ("unmatched" for anything else), never the raw
    path: label sets stay bounded and a key pasted into a URL never reaches Prometheus."""

    def __init__(self) -> None:
        try:
            from ray.util.metrics import Counter, Histogram

            from tailorlm import metric_names as m

            self.requests = Counter(m.REQUESTS, "HTTP requests by route and status", tag_keys=("route", "status"))
            self.errors = Counter(m.ERRORS, "HTTP 4xx/5xx responses", tag_keys=("route", "status"))
            self.latency = Histogram(
                m.LATENCY,
                "request latency in seconds",
                boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
                tag_keys=("route",),
            )
        except Exception:  # outside a Ray worker (unit tests): count nothing
            self.requests = self.errors = self.latency = None

    def observe(self, route: str, status: int, seconds: float) -> None:
        if self.requests is None:
            return
        tags = {"route": route, "status": str(status)}
        self.requests.inc(tags=tags)
        if status >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(seconds, tags={"route": route})
