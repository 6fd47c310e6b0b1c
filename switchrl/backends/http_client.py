"""JSON over HTTP for candidates served by a server: one pooled keep-alive client, retries with backoff.

Kept apart from the OpenAI backend because it knows nothing of tokens or completions: it sends a JSON
body, returns the JSON answer, and decides what a failure means. Transient failures (HTTP 429 and 5xx,
timeouts, refused, reset or dropped connections) are retried with exponential backoff, or after the
server's ``Retry-After`` when it names a longer wait (at most 60 s); any other 4xx is the request's fault and fails at once with the server's message. One client per server; several
servers are several clients, each with its own connection pool.
"""

from __future__ import annotations

import json
import random
import socket
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from switchrl.errors import SwitchRLError

_MAX_DELAY = 60.0  # seconds: the longest wait before a retry, however many retries are allowed
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), 0 when absent or
    unreadable, at most 60: a server that sheds load (vLLM behind a gateway, hosted APIs on 429) says
    when to come back, and coming back sooner only earns another refusal."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError):
            return 0.0
    return min(_MAX_DELAY, max(0.0, seconds))


class ServerError(SwitchRLError):
    """A server could not be reached or answered with an error (the message names it and the fix)."""


def is_transient(status: int) -> bool:
    """HTTP statuses worth retrying: overload (429) and server-side failures (5xx)."""
    return status == 429 or status >= 500


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is sent again."""

    max_retries: int = 2
    backoff: float = 0.5  # seconds before the first retry; doubles with each further one

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0:
            raise ValueError(
                f"max_retries and retry_backoff must be >= 0, got {self.max_retries} and {self.backoff}"
            )

    def delay(self, attempt: int, draw: float) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based): ``backoff * 2**attempt`` (at most
        60 s), of which the jitter ``draw`` in [0, 1) keeps half to all, so that the requests that failed
        together (one step's, or several workers') do not all come back at the same instant."""
        return min(_MAX_DELAY, self.backoff * 2**attempt) * (0.5 + draw / 2)


class JSONClient:
    """``POST`` JSON to ``base_url`` over a pool of at most ``max_connections`` keep-alive connections.

    Thread-safe: the requests of one step are sent from several threads over the shared pool. ``who``
    (e.g. ``candidate 'c0'``) and ``server`` (e.g. ``completions server``) start every error message.
    The jitter of the backoff comes from an unseeded generator: it only spaces retries in time and
    changes no answer, so records stay reproducible. Servers are addressed directly: ``HTTP_PROXY`` and
    the like are not used (cluster nodes often set them for the internet, not for inference hosts).
    """

    def __init__(
        self,
        base_url: str,
        who: str,
        server: str = "server",
        timeout: float = 300.0,
        max_connections: int = 32,
        retry: RetryPolicy | None = None,
        api_key: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.who, self.server, self.timeout = who, server, timeout
        self.retry = retry or RetryPolicy()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            # every phase (connect, send, each read) gets `timeout`; waiting for a pooled connection does
            # not count: the caller already bounds how many requests are in flight
            timeout=httpx.Timeout(timeout, pool=None),
            transport=httpx.HTTPTransport(
                limits=httpx.Limits(
                    max_connections=max_connections, max_keepalive_connections=max_connections
                ),
                # headers and body go out as two writes; as in urllib3, TCP_NODELAY keeps Nagle from holding
                # the body back until the server's (delayed) ACK of the headers
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            ),
        )
        self._jitter = random.Random()

    def post(self, path: str, body: dict) -> object:
        """The decoded JSON answer of ``POST {base_url}/{path}``, retrying transient failures."""
        url = f"{self.base_url}/{path}"
        data = json.dumps(body).encode()
        attempts = self.retry.max_retries + 1
        failure, unreachable, asked = "", False, 0.0
        for attempt in range(attempts):
            if attempt:
                time.sleep(max(asked, self.retry.delay(attempt - 1, self._jitter.random())))
            asked = 0.0
            try:
                response = self._client.post(url, content=data)
            except _TRANSIENT as err:
                failure, unreachable = self._describe(err), isinstance(err, httpx.ConnectError)
                continue
            except httpx.HTTPError as err:  # not the network's fault (e.g. a malformed URL): no retry
                raise ServerError(f"{self.who}: cannot send to {url}: {self._describe(err)}") from None
            if response.is_success:
                try:
                    return response.json()
                except ValueError as err:
                    raise ServerError(f"{self.who}: {url} did not answer JSON: {err}") from None
            failure, unreachable = f"HTTP {response.status_code}: {response.text[:500]}", False
            asked = retry_after(response.headers.get("Retry-After"))
            if not is_transient(response.status_code):
                hint = (
                    "; check the candidate's api_key (or the OPENAI_API_KEY environment variable)"
                    if response.status_code in (401, 403)
                    else ""
                )
                raise ServerError(f"{self.who}: {url} answered {failure}{hint}")
        tries = f"{attempts} attempt{'s' * (attempts > 1)}"
        if unreachable:
            raise ServerError(
                f"{self.who}: cannot reach the {self.server} at {self.base_url} ({failure}; {tries}); "
                "is it running and is base_url right?"
            )
        raise ServerError(
            f"{self.who}: {url} failed {tries}, the last with {failure}; check the {self.server}'s log, "
            f"or give it more time or tries (the candidate's timeout: {self.timeout:g} s, "
            f"max_retries: {self.retry.max_retries})"
        )

    def _describe(self, err: httpx.HTTPError) -> str:
        if isinstance(err, httpx.TimeoutException):
            return f"no answer within {self.timeout:g} s ({type(err).__name__})"
        return f"{type(err).__name__}: {err or 'no detail'}"

    def close(self) -> None:
        """Close the pooled connections (idempotent); the client cannot send afterwards."""
        self._client.close()
