"""Optional API keys and a per-key concurrency limit, for REST (FastAPI dependencies) and gRPC
(`api.grpc_auth`).

Keys come from ``HEADCT_API_KEYS`` (comma-separated) and/or ``HEADCT_API_KEYS_FILE`` (one key per
line, ``#`` comments; the Helm chart mounts its Secret there and rotating the Secret is picked up
without a restart). No key configured at all means the API is open: every caller is anonymous.

A key in the file may be limited to some priority lanes (api/inference/lanes.py) with ``lanes=``
after it, e.g. ``k-cohort-team lanes=bulk``: a cohort-scoring key cannot send STAT work, and its
predictions default to its best lane. Keys without ``lanes=`` (and all ``HEADCT_API_KEYS``) may use
every lane.

A caller sends ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. The key is compared with
`hmac.compare_digest` against *every* configured key, so the time taken does not reveal which key
(or how much of one) matched. Logs and metrics only ever see `key_id`, a short hash of the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Annotated, Final

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from api.inference.lanes import ALL_LANES, Lane, parse_lanes
from api.problems import ProblemCode, ProblemError, problem_responses
from api.settings import Settings

logger = logging.getLogger(__name__)

API_KEY_HEADER: Final = "X-API-Key"
ANONYMOUS: Final = "anonymous"
_REALM: Final = 'Bearer realm="headct"'


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key in logs and metrics (never the key itself)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_keys(text: str, *, separator: str | None = None) -> list[str]:
    """Keys from env text (`separator` = ","), or from file text: one a line, `#` starts a comment
    (so keys in a file cannot contain `#`; the chart's generated keys are alphanumeric)."""
    if separator:
        return [part.strip() for part in text.split(separator) if part.strip()]
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def parse_key_entries(text: str) -> list[tuple[str, frozenset[Lane]]]:
    """The keys file: one key a line, optionally followed by ``lanes=stat,routine,bulk``; `#` starts a
    comment. A line whose lanes cannot be read is left out (logged by line number, never the key)."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        key, _, rest = line.split("#", 1)[0].strip().partition(" ")
        if not key:
            continue
        lanes = ALL_LANES
        option = rest.strip()
        if option:
            name, _, value = option.partition("=")
            try:
                if name.strip() != "lanes":
                    raise ValueError(f"unknown option {name.strip()!r}")
                lanes = parse_lanes(value)
            except ValueError as error:
                logger.error("API keys file line %d ignored: %s", number, error)
                continue
        entries.append((key, lanes))
    return entries


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Keyring:
    """The configured keys; the file is re-read when its modification time changes (Secret rotation)."""

    def __init__(self, env_keys: Iterable[str] = (), path: str | Path | None = None) -> None:
        self._env = [key.encode() for key in env_keys]
        self._path = Path(path) if path else None
        self._file: list[bytes] = []
        self._lanes: dict[str, frozenset[Lane]] = {}  # by key_id; keys not here may use every lane
        self._stamp: tuple[int, int] | None = None
        self._reload()

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        return cls(parse_keys(settings.api_keys, separator=","), settings.api_keys_file)

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            stat = self._path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            entries = parse_key_entries(self._path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            # A configured but unreadable file must not silently open the API: no file keys, and
            # `enabled` stays true, so every request but the env keys' is refused until it is back.
            if self._stamp != (-1, -1):
                logger.error("API keys file is missing or unreadable; refusing its keys")
            self._file, self._lanes, self._stamp = [], {}, (-1, -1)
            return
        self._file, self._stamp = [key.encode() for key, _ in entries], stamp
        self._lanes = {key_id(key): lanes for key, lanes in entries if lanes != ALL_LANES}
        logger.info("API keys loaded", extra={"api_keys": len(self._env) + len(self._file)})

    @property
    def enabled(self) -> bool:
        return bool(self._env) or self._path is not None

    def matches(self, candidate: str) -> bool:
        self._reload()
        given = candidate.encode()
        matched = False
        for key in (*self._env, *self._file):
            # No early exit: every key is compared, whichever matches.
            matched |= hmac.compare_digest(given, key)
        return matched

    def authenticate(self, x_api_key: str | None, authorization: str | None) -> str:
        """The caller's `key_id`, `ANONYMOUS` when keys are off; raises a 401 problem otherwise."""
        if not self.enabled:
            return ANONYMOUS
        candidate = x_api_key or (bearer_token(authorization) if authorization else None)
        if not candidate:
            raise ProblemError(
                ProblemCode.MISSING_API_KEY,
                f"this gateway requires an API key: send `{API_KEY_HEADER}: <key>` or "
                "`Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": _REALM},
            )
        if not self.matches(candidate):
            raise ProblemError(
                ProblemCode.INVALID_API_KEY,
                "the API key is not valid",
                headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        return key_id(candidate)

    def lanes(self, identity: str) -> frozenset[Lane]:
        """The priority lanes the caller (`authenticate`'s answer) may send predictions in."""
        return self._lanes.get(identity, ALL_LANES)


class KeySlots:
    """At most `limit` concurrent predictions per key (0 = no limit). Per process (with several
    workers each has its own counters); one event loop, so plain counters need no lock."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._busy: dict[str, int] = {}

    def acquire(self, identity: str) -> None:
        """Take a slot, or raise the 429 problem. Anonymous callers (keys off) are not limited."""
        if self.limit == 0 or identity == ANONYMOUS:
            return
        if self._busy.get(identity, 0) >= self.limit:
            raise ProblemError(
                ProblemCode.KEY_CONCURRENCY_EXCEEDED,
                f"this API key already has {self.limit} predictions in flight; retry later",
                expected=f"<= {self.limit} concurrent requests per API key",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self._busy[identity] = self._busy.get(identity, 0) + 1

    def release(self, identity: str) -> None:
        if identity not in self._busy:
            return
        self._busy[identity] -= 1
        if not self._busy[identity]:
            del self._busy[identity]

    def busy(self, identity: str) -> int:
        return self._busy.get(identity, 0)

    @contextlib.asynccontextmanager
    async def hold(self, identity: str) -> AsyncIterator[None]:
        self.acquire(identity)
        try:
            yield
        finally:
            self.release(identity)


# One keyring and one set of counters per Settings object, shared by the REST and gRPC front ends of
# a gateway (a key's limit counts both). Keyed by id() because Settings is not hashable.
_SHARED: dict[int, tuple[Settings, Keyring, KeySlots]] = {}


def _shared(settings: Settings) -> tuple[Settings, Keyring, KeySlots]:
    entry = _SHARED.get(id(settings))
    if entry is None or entry[0] is not settings:
        # A busy key is a 429 like a busy gateway: the busy Retry-After, not the 503 one.
        slots = KeySlots(settings.per_key_concurrency, settings.busy_retry_after_s)
        entry = _SHARED[id(settings)] = (settings, Keyring.from_settings(settings), slots)
    return entry


def keyring(settings: Settings) -> Keyring:
    return _shared(settings)[1]


def key_slots(settings: Settings) -> KeySlots:
    return _shared(settings)[2]


# --- FastAPI dependencies -------------------------------------------------------------------------
# The security classes only read the headers (auto_error=False: our own problem+json 401 instead of
# FastAPI's); declaring them here puts both schemes into the OpenAPI document.
_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, scheme_name="ApiKey")
_bearer = HTTPBearer(auto_error=False, scheme_name="Bearer", description="the API key as a bearer token")


async def require_api_key(
    request: Request,
    x_api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The caller's key id (also put on `request.state.api_key_id` for the access log)."""
    authorization = f"Bearer {bearer.credentials}" if bearer else None
    identity = keyring(request.app.state.settings).authenticate(x_api_key, authorization)
    request.state.api_key_id = identity
    return identity


async def predict_slot(
    request: Request, identity: Annotated[str, Depends(require_api_key)]
) -> AsyncIterator[str]:
    """`require_api_key` plus one of the key's concurrency slots, held until the response is done."""
    async with key_slots(request.app.state.settings).hold(identity):
        yield identity


# OpenAPI error responses the API-key dependencies add to the routes they guard.
UNAUTHORIZED_RESPONSE: Final = problem_responses(ProblemCode.MISSING_API_KEY, ProblemCode.INVALID_API_KEY)
KEY_LIMIT_RESPONSE: Final = problem_responses(ProblemCode.KEY_CONCURRENCY_EXCEEDED)

__all__ = [
    "ANONYMOUS",
    "API_KEY_HEADER",
    "KEY_LIMIT_RESPONSE",
    "UNAUTHORIZED_RESPONSE",
    "KeySlots",
    "Keyring",
    "bearer_token",
    "key_id",
    "key_slots",
    "keyring",
    "parse_key_entries",
    "parse_keys",
    "predict_slot",
    "require_api_key",
]
