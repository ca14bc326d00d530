"""The served surface, deny by default: the routes the endpoint answers and the request bodies
they accept (/v1/feedback is ours: the guard answers it). Everything vLLM's app mounts beyond
this table (/invocations, /tokenize, /scale_elastic_ep, /v1/responses, /metrics, /docs, ...)
answers 404.

The bodies are a strict subset of OpenAI's (and vLLM's) request schemas: an unknown field, a wrong
type (`"max_tokens": true`), a value out of range, an unknown role or a non-text content part is a
400 that names the field, before vLLM sees the body. Tools, function calling and structured
output formats are refused with a 400 that says so: this server does not run them end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT64 = 2**63 - 1
UNSUPPORTED = {
    "tools": "tools / function calling are not supported by this server",
    "tool_choice": "tools / function calling are not supported by this server",
    "functions": "tools / function calling are not supported by this server",
    "function_call": "tools / function calling are not supported by this server",
    "parallel_tool_calls": "tools / function calling are not supported by this server",
    "suffix": "suffix (insertion) is not supported by this server",
    "best_of": "best_of is not supported by this server; use n",
}


class _Body(BaseModel):
    # strict: `"max_tokens": true` or `"n": "2"` is an error, not a silent coercion
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


Stop = Annotated[str, Field(max_length=256)]


class _Sampling(_Body):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2)] | None = None
    seed: Annotated[int, Field(ge=-INT64 - 1, le=INT64)] | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=16)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]


class CompletionBody(_Sampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=64)] | None = None
    name: Annotated[str, Field(max_length=64)] | None = None


class TextFormat(_Body):
    type: Literal["text"]


class ChatBody(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=512)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: TextFormat | None = None


class FeedbackBody(_Body):
    """POST /v1/feedback: a client's rating of an answer it got (serve.capture)."""

    id: Annotated[str, Field(min_length=1, max_length=200)]  # the response's id ("chatcmpl-...", "cmpl-...")
    score: Annotated[float, Field(ge=-100, le=100)]  # e.g. 1 / 0 (thumbs), or a 1-5 rating
    comment: Annotated[str, Field(max_length=4000)] | None = None  # a correction or remark; PII redacted


@dataclass(frozen=True)
class Route:
    """One allow-listed route: `name` is its metrics label (bounded, never the raw path)."""

    method: str
    path: str
    name: str
    body: type[_Body] | None = None
    generates: bool = False  # counted against the in-flight capacity and the token budget


ROUTES = (
    Route("GET", "/v1/models", "models"),
    Route("POST", "/v1/completions", "completions", CompletionBody, generates=True),
    Route("POST", "/v1/chat/completions", "chat_completions", ChatBody, generates=True),
    Route("POST", "/v1/feedback", "feedback", FeedbackBody),  # answered by the guard itself (capture.py)
)
FEEDBACK = ROUTES[-1]
HEALTH = Route("GET", "/health", "health")
OPENAPI = Route("GET", "/openapi.json", "openapi")  # only with serve.guard.openapi_schema: true
BY_PATH = {r.path: r for r in (*ROUTES, HEALTH, OPENAPI)}


class BodyError(ValueError):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def validate_body(route: Route, body: Any) -> dict[str, Any]:
    """The body as a dict with only the fields it set, or BodyError naming the first bad field."""
    if not isinstance(body, dict):
        raise BodyError("request body must be a JSON object", None)
    for key, why in UNSUPPORTED.items():
        if key in body and not (key == "tool_choice" and body[key] == "none"):
            raise BodyError(why, key)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise BodyError(
            f"response_format type {fmt.get('type')!r} is not supported by this server (only 'text')", "response_format"
        )
    try:
        model = route.body.model_validate(body)
    except ValidationError as exc:
        raise _body_error(route, exc) from None
    return model.model_dump(exclude_unset=True)


UNION_HINTS = {
    "prompt": "prompt must be a non-empty string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "stop must be a string or a list of at most 16 strings of at most 256 characters",
}
_TAGS = {"str", "int", "float", "bool", "none"}


def _body_error(route: Route, exc: ValidationError) -> BodyError:
    """One clear error for pydantic's list: the deepest location, union member tags left out."""

    def where(err) -> list[str]:
        return [str(p) for p in err["loc"] if isinstance(p, int) or (str(p).isidentifier() and str(p) not in _TAGS)]

    errors = exc.errors(include_url=False, include_input=False)
    err = max(errors, key=lambda e: len(where(e)))
    loc = where(err)
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        allowed = f" (fields this route accepts: {', '.join(sorted(route.body.model_fields))})" if len(loc) == 1 else ""
        return BodyError(f"unknown or unsupported field {param!r}{allowed}", param)
    if loc and loc[0] in UNION_HINTS and len({e["loc"][1:2] for e in errors if e["loc"][:1] == (loc[0],)}) > 1:
        return BodyError(UNION_HINTS[loc[0]], loc[0])
    return BodyError(f"{param or 'body'}: {err['msg']}", param)


def openapi_schema(title: str = "tailorlm") -> dict[str, Any]:
    """An OpenAPI 3.1 document of the allow-listed surface (served at /openapi.json when
    serve.guard.openapi_schema is on; the API fuzzing tests run schemathesis over it)."""
    from pydantic.json_schema import models_json_schema

    bodies = [r.body for r in ROUTES if r.body is not None]
    _, defs = models_json_schema([(b, "validation") for b in bodies], ref_template="#/components/schemas/{model}")
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {},
                },
            }
        },
    }
    responses = {
        "200": {"description": "OK"},
        **{
            str(s): {"description": d, "content": {"application/json": {"schema": error}}}
            for s, d in [
                (400, "invalid request"),
                (401, "missing or wrong API key"),
                (404, "unknown route or model"),
                (408, "request body timed out"),
                (413, "request too large"),
                (429, "rate limited"),
                (503, "over capacity"),
            ]
        },
    }
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"operationId": r.name, "responses": responses, "security": [{"bearer": []}]}
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{r.body.__name__}"}}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    paths[HEALTH.path] = {"get": {"operationId": "health", "responses": {"200": {"description": "OK"}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
