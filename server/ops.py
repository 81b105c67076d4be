"""Operations endpoints beside the gradient service: the standard grpc.health.v1 Health
service, server reflection, and Prometheus metrics over HTTP.

The Health and reflection packages (grpcio-health-checking, grpcio-reflection) and
prometheus-client come with the `server` extra; a server without them still starts and
serves gradients, and says in its log what it left out.
"""

from __future__ import annotations

import logging

log = logging.getLogger("gradserve.server")

SERVICE_NAME = "gradserve.v1.GradientService"


class Health:
    """SERVING / NOT_SERVING for the whole server ("") and for the gradient service."""

    def __init__(self, server):
        try:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        except ImportError:
            log.warning("grpcio-health-checking is not installed: no grpc.health.v1 service")
            self._servicer = None
            return
        self._pb = health_pb2
        self._servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def set_serving(self, serving: bool) -> None:
        if self._servicer is None:
            return
        status = (
            self._pb.HealthCheckResponse.SERVING
            if serving
            else self._pb.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._servicer.set(name, status)


def enable_reflection(server) -> None:
    try:
        from grpc_reflection.v1alpha import reflection
    except ImportError:
        log.warning("grpcio-reflection is not installed: no server reflection")
        return
    names = (SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
