"""The contracts: HTTP models, the bus envelope, model input contracts, the error shape."""

from schemas.contracts import ModelConfig, TensorInput, TextEmbeddingInput
from schemas.envelope import JobEnvelope
from schemas.errors import ErrorCode, ErrorDetail, ErrorResponse
from schemas.jobs import JobError, JobPage, JobRequest, JobResource, JobStatus, ModelInfo, ModelList

__all__ = [
    "ErrorCode",
    "ErrorDetail",
    "ErrorResponse",
    "JobEnvelope",
    "JobError",
    "JobPage",
    "JobRequest",
    "JobResource",
    "JobStatus",
    "ModelConfig",
    "ModelInfo",
    "ModelList",
    "TensorInput",
    "TextEmbeddingInput",
]
