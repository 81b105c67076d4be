from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]
    DATA_TYPE_FLOAT16: _ClassVar[DataType]
    DATA_TYPE_BFLOAT16: _ClassVar[DataType]
    DATA_TYPE_INT64: _ClassVar[DataType]
    DATA_TYPE_INT32: _ClassVar[DataType]

class ActivationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_KIND_UNSPECIFIED: _ClassVar[ActivationKind]
    ACTIVATION_KIND_IDENTITY: _ClassVar[ActivationKind]
    ACTIVATION_KIND_RELU: _ClassVar[ActivationKind]
    ACTIVATION_KIND_LEAKY_RELU: _ClassVar[ActivationKind]
    ACTIVATION_KIND_TANH: _ClassVar[ActivationKind]
    ACTIVATION_KIND_SIGMOID: _ClassVar[ActivationKind]
    ACTIVATION_KIND_GELU: _ClassVar[ActivationKind]
    ACTIVATION_KIND_SILU: _ClassVar[ActivationKind]
    ACTIVATION_KIND_SOFTPLUS: _ClassVar[ActivationKind]

class LossKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_KIND_UNSPECIFIED: _ClassVar[LossKind]
    LOSS_KIND_MSE: _ClassVar[LossKind]
    LOSS_KIND_L1: _ClassVar[LossKind]
    LOSS_KIND_HUBER: _ClassVar[LossKind]
    LOSS_KIND_BCE_WITH_LOGITS: _ClassVar[LossKind]
    LOSS_KIND_CROSS_ENTROPY: _ClassVar[LossKind]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]
    REDUCTION_SUM: _ClassVar[Reduction]

class Precision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRECISION_UNSPECIFIED: _ClassVar[Precision]
    PRECISION_FLOAT32: _ClassVar[Precision]
    PRECISION_TF32: _ClassVar[Precision]
    PRECISION_BFLOAT16: _ClassVar[Precision]
    PRECISION_FLOAT16: _ClassVar[Precision]
    PRECISION_FLOAT64: _ClassVar[Precision]

class Backend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKEND_UNSPECIFIED: _ClassVar[Backend]
    BACKEND_AUTO: _ClassVar[Backend]
    BACKEND_TORCH: _ClassVar[Backend]
    BACKEND_TRITON: _ClassVar[Backend]

class OptimizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_KIND_UNSPECIFIED: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_SGD: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_ADAM: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_ADAMW: _ClassVar[OptimizerKind]
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
DATA_TYPE_FLOAT16: DataType
DATA_TYPE_BFLOAT16: DataType
DATA_TYPE_INT64: DataType
DATA_TYPE_INT32: DataType
ACTIVATION_KIND_UNSPECIFIED: ActivationKind
ACTIVATION_KIND_IDENTITY: ActivationKind
ACTIVATION_KIND_RELU: ActivationKind
ACTIVATION_KIND_LEAKY_RELU: ActivationKind
ACTIVATION_KIND_TANH: ActivationKind
ACTIVATION_KIND_SIGMOID: ActivationKind
ACTIVATION_KIND_GELU: ActivationKind
ACTIVATION_KIND_SILU: ActivationKind
ACTIVATION_KIND_SOFTPLUS: ActivationKind
LOSS_KIND_UNSPECIFIED: LossKind
LOSS_KIND_MSE: LossKind
LOSS_KIND_L1: LossKind
LOSS_KIND_HUBER: LossKind
LOSS_KIND_BCE_WITH_LOGITS: LossKind
LOSS_KIND_CROSS_ENTROPY: LossKind
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_MEAN: Reduction
REDUCTION_SUM: Reduction
PRECISION_UNSPECIFIED: Precision
PRECISION_FLOAT32: Precision
PRECISION_TF32: Precision
PRECISION_BFLOAT16: Precision
PRECISION_FLOAT16: Precision
PRECISION_FLOAT64: Precision
BACKEND_UNSPECIFIED: Backend
BACKEND_AUTO: Backend
BACKEND_TORCH: Backend
BACKEND_TRITON: Backend
OPTIMIZER_KIND_UNSPECIFIED: OptimizerKind
OPTIMIZER_KIND_SGD: OptimizerKind
OPTIMIZER_KIND_ADAM: OptimizerKind
OPTIMIZER_KIND_ADAMW: OptimizerKind

class Activation(_message.Message):
    __slots__ = ("kind", "negative_slope")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_SLOPE_FIELD_NUMBER: _ClassVar[int]
    kind: ActivationKind
    negative_slope: float
    def __init__(self, kind: _Optional[_Union[ActivationKind, str]] = ..., negative_slope: _Optional[float] = ...) -> None: ...

class Architecture(_message.Message):
    __slots__ = ("layer_sizes", "hidden_activation", "output_activation", "layers_without_bias")
    LAYER_SIZES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_WITHOUT_BIAS_FIELD_NUMBER: _ClassVar[int]
    layer_sizes: _containers.RepeatedScalarFieldContainer[int]
    hidden_activation: Activation
    output_activation: Activation
    layers_without_bias: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer_sizes: _Optional[_Iterable[int]] = ..., hidden_activation: _Optional[_Union[Activation, _Mapping]] = ..., output_activation: _Optional[_Union[Activation, _Mapping]] = ..., layers_without_bias: _Optional[_Iterable[int]] = ...) -> None: ...

class Loss(_message.Message):
    __slots__ = ("kind", "reduction", "huber_delta")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    HUBER_DELTA_FIELD_NUMBER: _ClassVar[int]
    kind: LossKind
    reduction: Reduction
    huber_delta: float
    def __init__(self, kind: _Optional[_Union[LossKind, str]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., huber_delta: _Optional[float] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("skip_parameter_gradients", "input_gradients", "per_sample_losses", "forward_outputs", "per_sample_gradient_norms")
    SKIP_PARAMETER_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    FORWARD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PER_SAMPLE_GRADIENT_NORMS_FIELD_NUMBER: _ClassVar[int]
    skip_parameter_gradients: bool
    input_gradients: bool
    per_sample_losses: bool
    forward_outputs: bool
    per_sample_gradient_norms: bool
    def __init__(self, skip_parameter_gradients: _Optional[bool] = ..., input_gradients: _Optional[bool] = ..., per_sample_losses: _Optional[bool] = ..., forward_outputs: _Optional[bool] = ..., per_sample_gradient_norms: _Optional[bool] = ...) -> None: ...

class TensorDescriptor(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PrivacyOptions(_message.Message):
    __slots__ = ("clip_norm", "noise_multiplier", "noise_seed")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    noise_multiplier: float
    noise_seed: int
    def __init__(self, clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., noise_seed: _Optional[int] = ...) -> None: ...

class OptimizerOptions(_message.Message):
    __slots__ = ("kind", "steps", "learning_rate", "momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps", "start_step", "return_state")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    kind: OptimizerKind
    steps: int
    learning_rate: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    start_step: int
    return_state: bool
    def __init__(self, kind: _Optional[_Union[OptimizerKind, str]] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., start_step: _Optional[int] = ..., return_state: _Optional[bool] = ...) -> None: ...

class JobHeader(_message.Message):
    __slots__ = ("architecture", "loss", "outputs", "precision", "backend", "gradient_dtype", "tensors", "allow_non_finite", "response_chunk_bytes", "client_tag", "privacy", "optimizer", "micro_batch_samples")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TAG_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    architecture: Architecture
    loss: Loss
    outputs: Outputs
    precision: Precision
    backend: Backend
    gradient_dtype: DataType
    tensors: _containers.RepeatedCompositeFieldContainer[TensorDescriptor]
    allow_non_finite: bool
    response_chunk_bytes: int
    client_tag: str
    privacy: PrivacyOptions
    optimizer: OptimizerOptions
    micro_batch_samples: int
    def __init__(self, architecture: _Optional[_Union[Architecture, _Mapping]] = ..., loss: _Optional[_Union[Loss, _Mapping]] = ..., outputs: _Optional[_Union[Outputs, _Mapping]] = ..., precision: _Optional[_Union[Precision, str]] = ..., backend: _Optional[_Union[Backend, str]] = ..., gradient_dtype: _Optional[_Union[DataType, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorDescriptor, _Mapping]]] = ..., allow_non_finite: _Optional[bool] = ..., response_chunk_bytes: _Optional[int] = ..., client_tag: _Optional[str] = ..., privacy: _Optional[_Union[PrivacyOptions, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerOptions, _Mapping]] = ..., micro_batch_samples: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: JobHeader
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    def __init__(self, header: _Optional[_Union[JobHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("job_id", "engine", "device", "results")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    engine: str
    device: str
    results: _containers.RepeatedCompositeFieldContainer[TensorDescriptor]
    def __init__(self, job_id: _Optional[str] = ..., engine: _Optional[str] = ..., device: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TensorDescriptor, _Mapping]]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("upload_seconds", "queue_seconds", "compute_seconds", "download_seconds")
    UPLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    upload_seconds: float
    queue_seconds: float
    compute_seconds: float
    download_seconds: float
    def __init__(self, upload_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., download_seconds: _Optional[float] = ...) -> None: ...

class JobSummary(_message.Message):
    __slots__ = ("timings", "flops", "bytes_received", "bytes_sent", "jobs_in_launch", "models_in_launch", "launch_flops", "achieved_flops_per_second")
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    JOBS_IN_LAUNCH_FIELD_NUMBER: _ClassVar[int]
    MODELS_IN_LAUNCH_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_FLOPS_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_FLOPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    timings: Timings
    flops: int
    bytes_received: int
    bytes_sent: int
    jobs_in_launch: int
    models_in_launch: int
    launch_flops: int
    achieved_flops_per_second: float
    def __init__(self, timings: _Optional[_Union[Timings, _Mapping]] = ..., flops: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., jobs_in_launch: _Optional[int] = ..., models_in_launch: _Optional[int] = ..., launch_flops: _Optional[int] = ..., achieved_flops_per_second: _Optional[float] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("accepted", "chunks", "summary")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    accepted: JobAccepted
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    summary: JobSummary
    def __init__(self, accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., summary: _Optional[_Union[JobSummary, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_job_bytes", "max_models", "max_samples", "max_width", "max_layers", "max_chunk_bytes", "default_chunk_bytes", "max_queued_jobs", "max_inflight_bytes", "max_optimizer_steps", "max_work_bytes", "upload_idle_timeout_seconds", "stream_window_bytes", "download_idle_timeout_seconds", "min_upload_bytes_per_second")
    MAX_JOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OPTIMIZER_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORK_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STREAM_WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_UPLOAD_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    max_job_bytes: int
    max_models: int
    max_samples: int
    max_width: int
    max_layers: int
    max_chunk_bytes: int
    default_chunk_bytes: int
    max_queued_jobs: int
    max_inflight_bytes: int
    max_optimizer_steps: int
    max_work_bytes: int
    upload_idle_timeout_seconds: float
    stream_window_bytes: int
    download_idle_timeout_seconds: float
    min_upload_bytes_per_second: int
    def __init__(self, max_job_bytes: _Optional[int] = ..., max_models: _Optional[int] = ..., max_samples: _Optional[int] = ..., max_width: _Optional[int] = ..., max_layers: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., default_chunk_bytes: _Optional[int] = ..., max_queued_jobs: _Optional[int] = ..., max_inflight_bytes: _Optional[int] = ..., max_optimizer_steps: _Optional[int] = ..., max_work_bytes: _Optional[int] = ..., upload_idle_timeout_seconds: _Optional[float] = ..., stream_window_bytes: _Optional[int] = ..., download_idle_timeout_seconds: _Optional[float] = ..., min_upload_bytes_per_second: _Optional[int] = ...) -> None: ...

class BatchingPolicy(_message.Message):
    __slots__ = ("max_delay_seconds", "max_jobs", "max_models", "max_bytes")
    MAX_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_delay_seconds: float
    max_jobs: int
    max_models: int
    max_bytes: int
    def __init__(self, max_delay_seconds: _Optional[float] = ..., max_jobs: _Optional[int] = ..., max_models: _Optional[int] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class ServerStats(_message.Message):
    __slots__ = ("launches", "launched_jobs", "launched_models", "queued_jobs", "inflight_jobs", "inflight_bytes", "completed_jobs", "failed_jobs")
    LAUNCHES_FIELD_NUMBER: _ClassVar[int]
    LAUNCHED_JOBS_FIELD_NUMBER: _ClassVar[int]
    LAUNCHED_MODELS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_JOBS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_JOBS_FIELD_NUMBER: _ClassVar[int]
    FAILED_JOBS_FIELD_NUMBER: _ClassVar[int]
    launches: int
    launched_jobs: int
    launched_models: int
    queued_jobs: int
    inflight_jobs: int
    inflight_bytes: int
    completed_jobs: int
    failed_jobs: int
    def __init__(self, launches: _Optional[int] = ..., launched_jobs: _Optional[int] = ..., launched_models: _Optional[int] = ..., queued_jobs: _Optional[int] = ..., inflight_jobs: _Optional[int] = ..., inflight_bytes: _Optional[int] = ..., completed_jobs: _Optional[int] = ..., failed_jobs: _Optional[int] = ...) -> None: ...

class EngineInfo(_message.Message):
    __slots__ = ("name", "device", "precisions", "float32_matmul", "library")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_MATMUL_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    precisions: _containers.RepeatedScalarFieldContainer[Precision]
    float32_matmul: str
    library: str
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., precisions: _Optional[_Iterable[_Union[Precision, str]]] = ..., float32_matmul: _Optional[str] = ..., library: _Optional[str] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "engines", "activations", "losses", "dtypes", "limits", "batching", "stats")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    version: str
    engines: _containers.RepeatedCompositeFieldContainer[EngineInfo]
    activations: _containers.RepeatedScalarFieldContainer[ActivationKind]
    losses: _containers.RepeatedScalarFieldContainer[LossKind]
    dtypes: _containers.RepeatedScalarFieldContainer[DataType]
    limits: Limits
    batching: BatchingPolicy
    stats: ServerStats
    def __init__(self, version: _Optional[str] = ..., engines: _Optional[_Iterable[_Union[EngineInfo, _Mapping]]] = ..., activations: _Optional[_Iterable[_Union[ActivationKind, str]]] = ..., losses: _Optional[_Iterable[_Union[LossKind, str]]] = ..., dtypes: _Optional[_Iterable[_Union[DataType, str]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., batching: _Optional[_Union[BatchingPolicy, _Mapping]] = ..., stats: _Optional[_Union[ServerStats, _Mapping]] = ...) -> None: ...
