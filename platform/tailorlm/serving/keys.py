"""API keys: read once by the process that needs them, checked by digest, never passed on.

The serving guard holds only SHA-256 digests of the keys (API keys are long random strings, so an
unsalted digest is as good as a password hash and costs ~1 us to check), so neither the replica's
init arguments (stored by Ray Serve in the GCS) nor its memory carry a usable key. `tailorlm`
calls `take_from_env` before it starts an embedded Ray: every Ray process inherits the
environment of the process that starts Ray, so a key left there would be readable by any task of
any job on the cluster. The driver keeps the keys in memory for its own sample request.
"""

from __future__ import annotations

import hashlib
import hmac
import os

_TAKEN: dict[str, list[str]] = {}  # env var name -> keys removed from this process's environment


def _split(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def take_from_env(env_name: str) -> None:
    """Move the keys in `env_name` out of os.environ into this process's memory."""
    value = os.environ.pop(env_name, None)
    if value is not None:
        _TAKEN[env_name] = _split(value)


def read_keys(guard) -> list[str]:
    """serve.guard.api_keys plus the keys in serve.guard.api_keys_env (from the environment, or
    taken from it), each stripped of surrounding whitespace."""
    env = os.environ.get(guard.api_keys_env)
    taken = _split(env) if env is not None else _TAKEN.get(guard.api_keys_env, [])
    return _split(",".join(guard.api_keys)) + taken


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_id(key_digest: str) -> str:
    """A short name of a key for logs, metrics and the A/B split (never the key itself)."""
    return key_digest[:8]


def matching_digest(token: str, digests: list[str]) -> str | None:
    """The digest `token` matches, or None. Compares against every digest with
    hmac.compare_digest and no early exit, so the time does not depend on which key (if any)
    matched or on how much of it did."""
    mine, found = digest(token), None
    for d in digests:
        if hmac.compare_digest(mine, d):
            found = d
    return found
