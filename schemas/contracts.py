"""Model input contracts and the model repository's config file.

The API validates a job's input against the contract of the model's adapter before accepting
it; the worker validates again, because services may publish straight onto the bus.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from schemas.jobs import ModelName, ModelVersion
from schemas.storable import not_bool


class TextEmbeddingInput(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(
        min_length=1,
        max_length=20_000,
        # stated for clients: something besides whitespace, and no NUL (see schemas.storable)
        pattern=r"^[^\x00]*[^\s\x00][^\x00]*$",
        description="The text to embed.",
    )

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text must contain at least one non-whitespace character")
        return v


class TensorInput(BaseModel):
    """A flat float32 tensor; the identity model echoes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: list[Annotated[float, BeforeValidator(not_bool)]] = Field(
        min_length=1, max_length=65_536
    )

    @field_validator("tensor")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if any(x != x or x in (float("inf"), float("-inf")) for x in v):
            raise ValueError("tensor values must be finite numbers")
        return v


AdapterName = Literal["text-embedding", "identity"]

ADAPTER_INPUTS: dict[str, type[BaseModel]] = {
    "text-embedding": TextEmbeddingInput,
    "identity": TensorInput,
}


class ModelConfig(BaseModel):
    """`<repository>/<name>/<version>/config.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ModelName
    version: ModelVersion
    adapter: AdapterName
    default: bool = Field(default=False, description="Picked when a job names no version.")
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=10_000)
    options: dict[str, Any] = Field(
        default_factory=dict, description="Adapter options, e.g. max_tokens for text-embedding."
    )

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)


class ContractViolation(ValueError):
    """An input does not fit its model's contract."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def validate_input(adapter: str, payload: dict[str, Any]) -> BaseModel:
    """Parse ``payload`` with the adapter's contract, or raise ContractViolation."""
    contract = ADAPTER_INPUTS[adapter]
    try:
        return contract.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        field = f"input.{loc}" if loc else "input"
        raise ContractViolation(f"{field}: {first['msg']}", field) from exc


def resolve_version(
    configs: list[ModelConfig], name: str, version: str | None
) -> ModelConfig | None:
    """The config a job runs on: the named version, else the default, else the highest."""
    candidates = [c for c in configs if c.name == name]
    if not candidates:
        return None
    if version is not None:
        return next((c for c in candidates if c.version == version), None)
    defaults = [c for c in candidates if c.default]
    pool = defaults or candidates
    return max(pool, key=lambda c: _version_sort_key(c.version))


def _version_sort_key(v: str) -> tuple[int, int | str]:
    return (1, int(v)) if v.isdigit() else (0, v)
