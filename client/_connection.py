"""Connection settings shared by the sync and asyncio clients: channels to one or more
addresses (round-robin, passing over those that do not answer), keepalive, TLS, bearer
tokens, and the retry policy."""

from __future__ import annotations

import itertools
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from gradserve.client import _tls
from gradserve.v1 import wire

# Every message stays under this: chunks default to 1 MiB, and a header of many descriptors
# is small. Raised from gRPC's 4 MiB default only to leave room for larger chunk settings.
MAX_MESSAGE_BYTES = 16 << 20
MIN_CHUNK_BYTES = 4096  # servers refuse a job sent in many messages much smaller than this


def call_timeout(timeout: float | None, default: float | None) -> float | None:
    """A call's deadline in seconds: its own, else the client's default."""
    if timeout is None:
        return default
    if not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout}")
    return timeout


def check_settings(timeout: float | None, chunk_bytes: int) -> None:
    """A client's default deadline and upload chunk size, refused early when unusable."""
    call_timeout(timeout, None)
    largest = MAX_MESSAGE_BYTES - (1 << 20)  # room for the chunk's framing
    # Servers bound a job's request messages by its bytes (one per 2 KiB); smaller chunks
    # would exceed that.
    if not MIN_CHUNK_BYTES <= chunk_bytes <= largest:
        raise ValueError(
            f"chunk_bytes must be in [{MIN_CHUNK_BYTES}, {largest}], got {chunk_bytes}"
        )


# While calls are in flight, ping the server this often and drop the connection when a ping
# goes unanswered this long: a job on a server that stopped answering (a hung or unplugged
# host) then fails UNAVAILABLE, and is retried elsewhere, instead of waiting forever (a
# dead peer sends no reset; TCP notices after hours). gradserve servers accept pings down
# to one a second during calls.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 20_000
# A new connection (TCP, TLS, HTTP/2 settings) must be up within this, else the address
# counts as down and the job moves on: a frozen server's kernel still accepts TCP
# connections that then never answer, and gRPC's default waits 20 s on one.
CONNECT_TIMEOUT_MS = 5_000


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # An address that resolves to several servers (dns:///a-headless-service:50051)
        # spreads jobs over all of them; one server: the same as the default pick_first.
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC core waits this long for any ping's answer (default 60 s), whatever the
        # keepalive timeout says (grpc/grpc#34647).
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC would stop pinging after two pings while the server sends nothing (a job
        # computing): keep pinging.
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC core's least connect timeout (named for the reconnect back-off it bounds).
        ("grpc.min_reconnect_backoff_ms", CONNECT_TIMEOUT_MS),
    ]


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential back-off and jitter for the status codes that mean "try
    again" (a server draining or restarting, a full queue). Jobs are pure functions of
    their inputs, so running one again is safe. A server's grpc-retry-pushback-ms trailer,
    when present, is the wait instead (up to a quarter more, spread); a negative one (a job
    over the server's limits) means no retry.

    A refusal with a pushback is a busy server shedding load, not a failing one: those are
    retried beyond max_attempts for up to `busy_retry_s` after the first attempt (and
    within the call's deadline), so that jobs queued behind a burst (compute_many of large
    jobs) run when room frees up instead of failing after a few hundred milliseconds."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    busy_retry_s: float = 60.0
    codes: frozenset = field(
        default_factory=lambda: frozenset(
            {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
        )
    )

    def delay(
        self,
        attempt: int,
        error: grpc.RpcError,
        deadline: float | None = None,
        first_attempt_at: float | None = None,
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up (a code not to
        retry, attempts and busy time used up, or a wait that would pass `deadline`).
        `deadline` and `first_attempt_at` are time.monotonic() values; without the latter
        a busy server's refusals count against max_attempts like any other."""
        wait = self._wait(attempt, error, first_attempt_at)
        if wait is None or (deadline is not None and time.monotonic() + wait >= deadline):
            return None
        return wait

    def _wait(
        self, attempt: int, error: grpc.RpcError, first_attempt_at: float | None
    ) -> float | None:
        code = error.code() if hasattr(error, "code") else None
        if code not in self.codes:
            return None
        pushback = _pushback_s(error)
        if pushback is None:
            backoff = self.initial_backoff_s * self.multiplier ** min(attempt, 64)
            wait = random.uniform(0, min(self.max_backoff_s, backoff))  # full jitter
            return wait if attempt + 1 < self.max_attempts else None
        if pushback < 0:  # the server's "over a configured limit": no retry, as gRPC's own
            return None
        # A busy server says when to come back (longer while many wait), and its wait
        # replaces the back-off, as in gRPC's own retries; spread a little so that the
        # jobs it refused together do not all return at once.
        wait = pushback * random.uniform(1.0, 1.25)
        if attempt + 1 < self.max_attempts:
            return wait
        busy_for = None if first_attempt_at is None else time.monotonic() - first_attempt_at
        return wait if busy_for is not None and busy_for + wait <= self.busy_retry_s else None


def busy_refusal(error: grpc.RpcError) -> bool:
    """A busy server's refusal (a pushback >= 0): room frees up as admitted jobs end."""
    pushback = _pushback_s(error)
    return pushback is not None and pushback >= 0


def _pushback_s(error: grpc.RpcError) -> float | None:
    """The grpc-retry-pushback-ms trailer in seconds; None without one, -1 for a negative
    or unreadable one (gRPC's retries do not retry either)."""
    try:
        trailers = dict(error.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - some errors carry no trailers
        return None
    if "grpc-retry-pushback-ms" not in trailers:
        return None
    try:
        pushback = int(trailers["grpc-retry-pushback-ms"])
    except ValueError:
        return -1
    return pushback / 1000 if pushback >= 0 else -1


NO_RETRIES = RetryPolicy(max_attempts=1, busy_retry_s=0)

# How long an address whose server did not answer (UNAVAILABLE: down, unreachable,
# draining) is passed over when a job picks where to go. Short, so that a server back up
# gets jobs again within about a second.
DOWN_FOR_S = 1.0


class Failover:
    """Where a client's jobs go among its addresses: round-robin, passing over one whose
    last attempt got UNAVAILABLE within DOWN_FOR_S while another is not known to be down,
    and moving a job that got UNAVAILABLE to the next address at once (without back-off)
    when that one is not known to be down. Back-off is for retrying a server that failed,
    not for trying another one; with every address down, jobs back off as before. Plain
    float stores: safe to share between threads and tasks."""

    def __init__(self, count: int):
        self.down_until = [0.0] * count
        self._turn = itertools.count()

    def first(self, pinned: int | None = None) -> int:
        """The first attempt's address: the round-robin turn (or `pinned`, a shard's own),
        or the next one after it that is not known to be down."""
        start = next(self._turn) if pinned is None else pinned
        return self._next_up(start % len(self.down_until), skip_self=False)

    def after(
        self, index: int, error: grpc.RpcError, delay: float | None
    ) -> tuple[int, float | None]:
        """The next attempt's address and wait, after `error` on `index`'s attempt and the
        retry policy's `delay` (None: no retry, which stays so)."""
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            self.answered(index)  # a server answered, if only to refuse
            return (index + 1) % len(self.down_until), delay
        self.down_until[index] = time.monotonic() + DOWN_FOR_S
        following = self._next_up(index, skip_self=True)
        if delay is not None and following != index and not self.is_down(following):
            return following, 0.0
        return following, delay

    def answered(self, index: int) -> None:
        self.down_until[index] = 0.0

    def is_down(self, index: int) -> bool:
        return self.down_until[index] > time.monotonic()

    def _next_up(self, index: int, skip_self: bool) -> int:
        count = len(self.down_until)
        for step in range(1 if skip_self else 0, count + 1):
            candidate = (index + step) % count
            if not self.is_down(candidate):
                return candidate
        return (index + 1) % count if skip_self else index


# "::1:50051", "fe80::1": an IPv6 address without the brackets that set its port apart
IPV6_UNBRACKETED = re.compile(r"[0-9a-fA-F:.]+")


@dataclass
class Connection:
    """How to reach the servers: addresses, TLS material, token."""

    addresses: list[str]
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None

    @classmethod
    def of(cls, address, *, token=None, tls=None, root_certificates=None,
           client_certificate=None, client_key=None) -> Connection:  # fmt: skip
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("at least one server address is needed")
        if not all(isinstance(a, str) and a.strip() for a in addresses):
            raise ValueError(f"server addresses must be non-empty 'host:port' strings: {address!r}")
        for a in addresses:
            if a.count(":") > 1 and IPV6_UNBRACKETED.fullmatch(a):  # gRPC reads it otherwise
                raise ValueError(
                    f"server address {a!r}: write an IPv6 address in brackets, as '[::1]:50051'"
                )
        if (client_certificate is None) != (client_key is None):
            # gRPC aborts the whole process on a certificate without its key
            raise ValueError("client_certificate and client_key go together")
        given = {"root_certificates": root_certificates,
                 "client_certificate": client_certificate, "client_key": client_key}  # fmt: skip
        use_tls = bool(tls) or any(m is not None for m in given.values())
        pems = (_tls.read_pem(root_certificates, "root_certificates", _tls.CERTIFICATE),
                _tls.read_pem(client_certificate, "client_certificate", _tls.CERTIFICATE),
                _tls.read_pem(client_key, "client_key", _tls.PRIVATE_KEY))  # fmt: skip
        _tls.check_usable(*pems, given)
        return cls(addresses, token, use_tls, *pems)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, aio: bool = False):
        module = grpc.aio if aio else grpc
        if not self.tls:
            return module.insecure_channel(address, options=channel_options())
        credentials = grpc.ssl_channel_credentials(
            self.root_certificates, self.client_key, self.client_certificate
        )
        return module.secure_channel(address, credentials, options=channel_options())


def compute_callable(channel):
    """Compute through the copy-saving chunk codec (same wire format as the stub's)."""
    return channel.stream_stream(
        wire.COMPUTE_METHOD,
        request_serializer=wire.encode_message,
        response_deserializer=wire.decode_response,
    )
