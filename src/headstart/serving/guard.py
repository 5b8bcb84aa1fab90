"""Who may call the service and how much work it takes on at once: an API key and a bounded queue, checked by one
ASGI middleware in front of every route, before a request body is read.

Access. With a key, every request must carry it as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, else 401.
Three things stay open, because they reveal nothing about the model and a browser must reach them to ask for the key:
the page (``GET /``), its script and styles (``GET /static/...``) and ``GET /health``, which without a key answers
only ``{"status": "ok", "auth": "required"}`` (a liveness probe needs no secret) and with a wrong key 401. Everything
else, ``/docs`` and ``/openapi.json`` included, is closed: a route added later is closed too unless it is named here.
The key is compared in constant time (:func:`hmac.compare_digest` on SHA-256 digests, so not even its length leaks).
It travels in the clear over plain HTTP: on a network, put a TLS-terminating proxy in front.

Overload. At most ``limit`` requests are admitted at a time (decoding, waiting for the model or running it); one past
that gets 503 at once, with ``Retry-After``, instead of waiting behind an ever longer queue. Unauthorised requests are
refused before they take a place. Requests for the open paths are never refused for load, so a health check keeps
answering while the service sheds work.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from headstart.errors import ConfigError

ENV_KEY = "HEADSTART_API_KEY"
MIN_KEY_LENGTH = 16  # characters; a shorter key could be guessed by a client that keeps asking
MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
OPEN_PATHS = frozenset({"/", "/health"})  # answered without a key and never shed (see the module docstring)
OPEN_PREFIX = "/static/"
MAX_RETRY_AFTER = 60  # seconds; a client told to wait longer might as well give up


def resolve_api_key(
    api_key: str | None = None, key_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The service's API key: from ``api_key``, else from ``key_file``, else from ``$HEADSTART_API_KEY``; None if none.

    Args:
        api_key: the key itself (``--api-key``; visible to every user of the machine in ``ps``, so prefer the others).
        key_file: a file holding the key on its first line (``--api-key-file``); surrounding whitespace is dropped.
        environ: the environment to read ``HEADSTART_API_KEY`` from (default ``os.environ``); empty means unset.

    Raises:
        ConfigError: both ``api_key`` and ``key_file`` given, an unreadable file, or a key too short or not printable
            ASCII (it must fit in an HTTP header).
    """
    if api_key is not None and key_file is not None:
        raise ConfigError("give the API key once: --api-key or --api-key-file, not both")
    if key_file is not None:
        path = Path(key_file)
        try:
            key, source = path.read_text(encoding="utf-8").strip(), f"--api-key-file {path}"
        except (OSError, UnicodeDecodeError) as error:
            message = f"--api-key-file {path}: cannot read the key ({error}); write it there on one line"
            raise ConfigError(message) from error
    elif api_key is not None:
        key, source = api_key, "--api-key"
    else:
        key, source = (os.environ if environ is None else environ).get(ENV_KEY, ""), ENV_KEY
        if not key:
            return None
    if len(key) < MIN_KEY_LENGTH or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ConfigError(
            f"{source}: an API key must be at least {MIN_KEY_LENGTH} characters of printable ASCII without spaces; "
            f"make one with: {MAKE_KEY}"
        )
    return key


def key_file_warning(key_file: str | Path) -> str | None:
    """A warning when other users of the machine may read the key file (as ssh says of a private key), else None."""
    mode = Path(key_file).stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"warning: {key_file} can be read by other users of this machine; chmod 600 {key_file}"
    return None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches only this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1).

    Any other name counts as reachable from the network, since it may resolve to anything.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool = False) -> str | None:
    """Refuse to serve a network address without a key; returns a warning to print when ``insecure`` allows it.

    Raises:
        ConfigError: ``host`` is not a loopback address, there is no key, and ``insecure`` is False.
    """
    if api_key is not None or is_loopback(host):
        return None
    if not insecure:
        raise ConfigError(
            f"--host {host} is reachable from other machines, and without an API key anyone who reaches it can call "
            f"the service; pass --api-key-file FILE (or set {ENV_KEY}, or --api-key KEY), "
            "or --insecure to serve it open anyway"
        )
    return f"warning: serving {host} with no API key (--insecure): anyone who can reach this address can call it"


def host_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The host name a request was addressed to (its ``Host`` header without the port), or ``""``."""
    for name, value in headers:
        if name == b"host":
            host = value.decode("latin-1").strip()
            return host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return ""


def is_open(path: str) -> bool:
    """Whether a path is answered without the key. A ``..`` segment closes it: ``/static/../predict`` is not open,
    whatever the router later makes of it."""
    return path in OPEN_PATHS or (path.startswith(OPEN_PREFIX) and ".." not in path.split("/"))


class ApiKey:
    """The service's key, kept only as its SHA-256 digest; :meth:`matches` takes the same time for every wrong key."""

    def __init__(self, key: str):
        self._digest = hashlib.sha256(key.encode("ascii")).digest()

    def matches(self, presented: bytes) -> bool:
        """Whether ``presented`` is the key. Digests have one length, so the comparison reveals nothing of the key's."""
        return hmac.compare_digest(hashlib.sha256(presented).digest(), self._digest)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer KEY`` first, else ``X-API-Key: KEY``; None if neither."""
    fields = dict(headers)  # ASGI header names are lower-case bytes
    scheme, _, token = fields.get(b"authorization", b"").strip().partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    key = fields.get(b"x-api-key", b"").strip()
    return key or None


@dataclass
class Queue:
    """The admission counters, shared by the middleware and ``GET /health``; touched only on the event loop's thread."""

    limit: int  # requests admitted at a time; one more gets 503
    in_flight: int = 0  # admitted and not yet answered
    shed: int = 0  # answered 503 since the start
    served: int = 0  # admitted since the start
    seconds: float = 1.0  # moving average of how long an admitted request takes, for Retry-After

    def retry_after(self) -> int:
        """Seconds a shed client should wait: about how long the requests now admitted take to be answered."""
        return min(MAX_RETRY_AFTER, max(1, math.ceil(self.seconds)))

    def snapshot(self) -> dict[str, int]:
        """The counters, for ``GET /health``."""
        return {"limit": self.limit, "in_flight": self.in_flight, "shed": self.shed, "served": self.served}


class Guard:
    """ASGI middleware: the key check, then admission, for every request but the open paths.

    Whether a request carried the right key is left in ``scope["state"]["authorised"]`` (``request.state`` in an
    endpoint), so ``GET /health`` can tell a caller without a key from one with it.
    """

    def __init__(self, app: ASGIApp, key: ApiKey | None, queue: Queue, any_host: bool = False):
        self.app, self.key, self.queue = app, key, queue
        # Without a key the service trusts whoever reaches it, which on loopback is this machine, unless a web page
        # reaches it through DNS rebinding: its requests name the attacker's host. So an open service answers only
        # requests addressed to a loopback name (``--insecure`` lifts this along with the key).
        self.loopback_hosts_only = key is None and not any_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if self.loopback_hosts_only and not is_loopback(host_of(scope["headers"])):
            if scope["type"] == "http":
                await _answer(
                    send,
                    403,
                    "this service has no API key, so it answers only requests addressed to "
                    "localhost or a loopback address; start it with an API key to serve other names",
                    [],
                )
            else:
                await receive()
                await send({"type": "websocket.close", "code": 1008})
            return
        open_path = is_open(scope["path"])
        presented = presented_key(scope["headers"])
        authorised = self.key is None or (presented is not None and self.key.matches(presented))
        scope.setdefault("state", {})["authorised"] = authorised
        if scope["type"] != "http":  # a WebSocket (the app serves none): the key is checked all the same
            if not authorised:
                await receive()  # websocket.connect; closing before accepting answers the handshake with 403
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if not authorised and (presented is not None or not open_path):
            # A wrong key is refused even on the open paths: that is how the page learns its stored key is stale.
            detail = "wrong API key" if presented is not None else "this service needs an API key"
            await _answer(send, 401, f"{detail}; send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                          [(b"www-authenticate", b'Bearer realm="headstart"')])  # fmt: skip
            return
        if open_path:
            await self.app(scope, receive, send)
            return
        await self._admit(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue = self.queue
        # No await between this test and the increment: on the one event-loop thread the pair is atomic.
        if queue.in_flight >= queue.limit:
            queue.shed += 1
            wait = queue.retry_after()
            await _answer(send, 503, f"the service is busy ({queue.limit} requests in progress); retry in {wait} s",
                          [(b"retry-after", str(wait).encode())])  # fmt: skip
            return
        queue.in_flight += 1
        queue.served += 1
        tic = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            queue.in_flight -= 1
            queue.seconds += 0.1 * (time.perf_counter() - tic - queue.seconds)


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    """A JSON ``{"detail": ...}`` response, the shape FastAPI gives its own errors. The request body is left unread:
    the server drains it, so the connection stays usable and the client reads this answer, not a reset."""
    body = json.dumps({"detail": detail}).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})
