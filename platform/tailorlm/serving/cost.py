"""What a request may cost: its worst-case token count, checked against the caps and charged to
the caller's token budget.

cost = prompt tokens + prompts x n x the effective max output tokens, where the effective max is
the largest of the output-length fields the body sets (vLLM prefers max_completion_tokens over
max_tokens on chat; taking the largest means no field can walk around the cap), or the cap when
none is set (the guard then writes the cap into the body, so an uncapped request cannot run to
the end of the context).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")
MESSAGE_OVERHEAD = 8  # chat template tokens around one message (role markers, separators)


@dataclass(frozen=True)
class Cost:
    prompt_lengths: tuple[int, ...]  # tokens of each prompt (one for chat)
    n: int
    max_output: int

    @property
    def prompts(self) -> int:
        return len(self.prompt_lengths)

    @property
    def total(self) -> int:
        return sum(self.prompt_lengths) + self.prompts * self.n * self.max_output


def prompt_lengths(body: dict[str, Any], count_tokens: Callable[[str], int]) -> tuple[int, ...]:
    """Tokens of each prompt of a validated completions or chat body."""
    prompt = body.get("prompt")
    if "messages" in body:
        tokens = 0
        for m in body["messages"]:
            content = m.get("content")
            parts = [content] if isinstance(content, str) else [p["text"] for p in content or []]
            tokens += MESSAGE_OVERHEAD + sum(count_tokens(p) for p in parts) + count_tokens(m.get("name") or "")
        return (tokens,)
    if isinstance(prompt, str):
        return (count_tokens(prompt),)
    if isinstance(prompt[0], int):
        return (len(prompt),)
    if isinstance(prompt[0], str):
        return tuple(count_tokens(p) for p in prompt)
    return tuple(len(ids) for ids in prompt)


def request_cost(body: dict[str, Any], default_output: int, lengths: tuple[int, ...]) -> Cost:
    """The worst-case cost of a validated body with prompts of `lengths` tokens; default_output:
    the max output when the body sets none."""
    set_fields = [body[f] for f in OUTPUT_FIELDS if body.get(f) is not None]
    return Cost(lengths, body.get("n") or 1, max(set_fields) if set_fields else default_output)


def cap_problem(cost: Cost, body: dict[str, Any], s, exact: bool) -> tuple[str, str | None] | None:
    """(message, param) when the request exceeds a cap, else None. exact: prompt tokens were
    counted with the model's tokenizer (not an upper bound), so the context check is fair."""
    for f in OUTPUT_FIELDS:
        if body.get(f) is not None and body[f] > s.guard.max_tokens_cap:
            return f"{f} {body[f]} exceeds this server's cap of {s.guard.max_tokens_cap}", f
    if (body.get("min_tokens") or 0) > cost.max_output:
        return f"min_tokens {body['min_tokens']} exceeds the request's max output of {cost.max_output}", "min_tokens"
    if cost.n > s.guard.max_n:
        return f"n {cost.n} exceeds this server's cap of {s.guard.max_n} choices per request", "n"
    if cost.prompts > s.guard.max_prompts:
        return f"{cost.prompts} prompts exceed this server's cap of {s.guard.max_prompts} per request", "prompt"
    longest, param = max(cost.prompt_lengths), "messages" if "messages" in body else "prompt"
    if exact and longest + cost.max_output > s.max_model_len:
        return (
            f"prompt of {longest} tokens plus {cost.max_output} output tokens exceeds the context of "
            f"{s.max_model_len} tokens",
            param,
        )
    if not exact and longest > 8 * s.max_model_len:  # no tokenizer yields under 1/8 token per byte
        return f"prompt is longer than the context of {s.max_model_len} tokens", param
    if cost.total > s.guard.tokens_per_minute:
        return (
            f"request costs up to {cost.total} tokens, more than this server's budget of "
            f"{s.guard.tokens_per_minute} tokens per minute per key (lower max_tokens, n or the number of prompts)",
            None,
        )
    return None


class TokenBucket:
    """Per-client token bucket refilling `per_minute` units a minute, bursts up to `per_minute`."""

    def __init__(self, per_minute: int, max_clients: int = 100_000):
        self.rate, self.capacity = per_minute / 60.0, float(per_minute)
        self.state: dict[str, tuple[float, float]] = {}
        self.max_clients = max_clients

    def _level(self, client: str, now: float) -> float:
        tokens, last = self.state.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def wait_s(self, client: str, amount: float = 1) -> float:
        """0 if `amount` is available now, else the seconds until it will be (nothing is taken)."""
        level = self._level(client, time.monotonic())
        return 0.0 if level >= amount else (amount - level) / self.rate

    def take(self, client: str, amount: float = 1) -> float:
        """Take `amount` if available and return 0, else return the seconds to wait."""
        now = time.monotonic()
        level = self._level(client, now)
        if level < amount:
            return (amount - level) / self.rate
        if len(self.state) >= self.max_clients and client not in self.state:
            # bounded memory under a flood of client names: forget those that have refilled
            self.state = {c: v for c, v in self.state.items() if self._level(c, now) < self.capacity}
        self.state[client] = (level - amount, now)
        return 0.0


def retry_after(seconds: float) -> bytes:
    return str(max(1, math.ceil(seconds))).encode()
