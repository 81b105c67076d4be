"""The gradserve gRPC server: validation, assembly, engine dispatch, streaming results."""

from gradserve.server.app import serve
from gradserve.server.config import ServerConfig

__all__ = ["ServerConfig", "serve"]
