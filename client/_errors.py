"""The client library's own exception type."""

from __future__ import annotations

import grpc


class GradserveError(Exception):
    """A job failed. `code` is the gRPC status code, `details` the server's message, and
    `violations` the (field, description) pairs of a google.rpc.BadRequest the server
    attached, when googleapis-common-protos is installed to read them."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 violations: list[tuple[str, str]] | None = None):  # fmt: skip
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.violations = violations or []

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> GradserveError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code, details or "", _field_violations(error))


def client_closed(while_running: bool = False) -> GradserveError:
    """A job or call on a closed client: CANCELLED, as gRPC reports calls a closing channel
    ended, so that compute_many returns it among its results."""
    when = "while the job ran" if while_running else "before this call"
    return GradserveError(grpc.StatusCode.CANCELLED, f"the client was closed {when}")


def _field_violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    try:
        trailers = dict(error.trailing_metadata() or ())
        raw = trailers.get("grpc-status-details-bin")
        if raw is None:
            return []
        from google.rpc import error_details_pb2, status_pb2
    except Exception:  # noqa: BLE001 - no trailers, or the thin client without google.rpc
        return []
    status = status_pb2.Status.FromString(raw)
    violations = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return violations
