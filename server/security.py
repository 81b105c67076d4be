"""Transport security and caller authentication: optional TLS (with optional client
certificates) and optional bearer tokens.

Token checks run in a server interceptor, before the RPC handler starts, so a caller
without valid credentials gets UNAUTHENTICATED and not one byte of its job is read. The
health service stays open so that load balancers and orchestrators can probe it.
"""

from __future__ import annotations

import hmac
import ssl

import grpc

from gradserve.server.config import ServerConfig

OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


def load_token(config: ServerConfig) -> str | None:
    """The configured bearer token (--auth-token-file wins over --auth-token), or None."""
    if config.auth_token_file:
        try:
            with open(config.auth_token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise SystemExit(f"--auth-token-file {config.auth_token_file}: {e.strerror}") from None
        if not token:
            raise SystemExit(f"{config.auth_token_file}: empty token file")
        return token
    return config.auth_token or None


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate and key are configured, else None (plaintext)."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")

    def read(path: str, flag: str, marker: bytes, kind: str) -> bytes:
        try:
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            raise SystemExit(f"{flag} {path}: {e.strerror}") from None
        if marker not in pem:
            raise SystemExit(f"{flag} {path}: not a PEM {kind} ({marker.decode()!r} not found)")
        return pem

    certificate, key = b"-----BEGIN CERTIFICATE-----", b"PRIVATE KEY-----"
    client_ca = (
        read(config.tls_client_ca, "--tls-client-ca", certificate, "certificate")
        if config.tls_client_ca
        else None
    )
    chain = (read(config.tls_key, "--tls-key", key, "private key"),
             read(config.tls_cert, "--tls-cert", certificate, "certificate"))  # fmt: skip
    check_tls_files(config)
    return grpc.ssl_server_credentials(
        [chain], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_tls_files(config: ServerConfig) -> None:
    """Load the certificate, its key and the client CA as OpenSSL reads them: gRPC takes a
    key that is not the certificate's, or a garbled PEM block, and then only fails to bind
    the port, the reason in its log ("could not bind" would name the wrong fault)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # (an empty password: an encrypted key fails here, which gRPC cannot read either,
        # rather than OpenSSL prompting on the terminal)
        context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as e:
        raise SystemExit(
            f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: unusable "
            f"({e.reason or e}); the key must be the certificate's own, unencrypted"
        ) from None
    if config.tls_client_ca:
        try:
            context.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as e:
            raise SystemExit(
                f"--tls-client-ca {config.tls_client_ca}: unusable ({e.reason or e})"
            ) from None


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only answers UNAUTHENTICATED."""

    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHODS_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):  # constant-time comparison
            return handler
        return _deny(handler)
