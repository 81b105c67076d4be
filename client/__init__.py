"""The thin gradserve client: numpy + grpcio + protobuf; torch only if you pass torch.

from gradserve.client import GradientClient

with GradientClient("localhost:50051") as client:
    result = client.compute(model, inputs, targets, loss="mse")
    result.loss, result.gradients
"""

from gradserve.client._aio import AsyncGradientClient
from gradserve.client._client import GradientClient
from gradserve.client._connection import NO_RETRIES, RetryPolicy
from gradserve.client._errors import GradserveError
from gradserve.client._job import ComputeResult, JobOptions

__all__ = [
    "AsyncGradientClient",
    "ComputeResult",
    "GradientClient",
    "GradserveError",
    "JobOptions",
    "NO_RETRIES",
    "RetryPolicy",
]
