"""Typed, validated run configs. Unknown keys and bad values raise one :class:`ConfigError` naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from switchrl.devices import check_device
from switchrl.errors import ConfigError

__all__ = [
    "CLIENT_SETTINGS",
    "SCHEDULES",
    "SCHEDULING",
    "Schedule",
    "CandidateConfig",
    "StrictModel",
    "SwitchGenerationConfig",
    "SwitcherConfig",
    "TaskSourceConfig",
    "format_validation_error",
    "load_yaml",
    "parse",
]


M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


CLIENT_SETTINGS = frozenset({"timeout", "max_concurrency", "max_retries", "retry_backoff", "api_key"})
"""How a candidate's server is talked to: nothing a record depends on, so fingerprints leave them out (and
with them the secret ``api_key``)."""


class CandidateConfig(StrictModel):
    """One checkpoint that can write patches."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1, description="local directory or hub id of the checkpoint")
    backend: Literal["transformers", "vllm", "openai"] = "transformers"
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = "auto"
    device: str = Field(
        "cpu",
        description="auto | cpu | cuda | cuda:N (auto and cuda: this rank's GPU under accelerate launch); "
        "vllm: auto | cuda | cuda:N (the engine's GPU) | cpu",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm backend: more vllm.LLM arguments, e.g. {gpu_memory_utilization: 0.45, "
        "max_model_len: 4096, tensor_parallel_size: 1, enforce_eager: true}",
    )
    chat_template: bool = False
    prompt_template: str = "{query}"
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop_strings: list[str] = Field(default_factory=list)
    eos_after: str | None = Field(
        None,
        description="regex: EOS is banned until the response text matches it (apply to every system alike)",
    )
    base_url: str | None = Field(None, description="openai backend: server address, e.g. http://host:8000/v1")
    served_model: str | None = Field(None, description="openai backend: the model name the server serves")
    timeout: float = Field(
        300.0, gt=0, description="openai backend: seconds each attempt of a request may take"
    )
    max_concurrency: int = Field(
        32, gt=0, description="openai backend: requests in flight at once (and pooled keep-alive connections)"
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="openai backend: retries of a request that met HTTP 429/5xx, a timeout or a lost connection",
    )
    retry_backoff: float = Field(
        0.5, ge=0, description="openai backend: seconds before the first retry; doubled for each further one"
    )
    api_key: str | None = Field(
        None,
        repr=False,
        description="openai backend: bearer token (default: the OPENAI_API_KEY environment variable); "
        "left out of fingerprints and logs",
    )

    @field_validator("prompt_template")
    @classmethod
    def _has_query(cls, v: str) -> str:
        if "{query}" not in v:
            raise ValueError("prompt_template must contain '{query}'")
        return v

    @model_validator(mode="after")
    def _client_settings_need_a_server(self) -> CandidateConfig:
        fields = type(self).model_fields
        given = sorted(f for f in CLIENT_SETTINGS if getattr(self, f) != fields[f].default)  # dumps hold all
        if self.backend != "openai" and given:
            raise ValueError(
                f"{', '.join(given)}: only for backend: openai (this candidate's is {self.backend})"
            )
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _engine_kwargs_for_vllm(self) -> CandidateConfig:
        if self.engine_kwargs and self.backend != "vllm":
            raise ValueError(
                f"engine_kwargs go to vllm.LLM: set 'backend: vllm' or remove them ({self.name})"
            )
        reserved = sorted({"model", "tokenizer", "dtype"} & set(self.engine_kwargs))
        if reserved:
            raise ValueError(f"engine_kwargs: {reserved} come from the candidate's path and dtype keys")
        return self


Schedule = Literal["auto", "grouped", "lockstep"]
SCHEDULES: tuple[str, ...] = ("auto", "grouped", "lockstep")

SCHEDULING = frozenset({"schedule", "max_inflight_bytes"})
"""Generation keys that choose which traces share a forward pass, not what they write (float32 records
are identical under every value: docs/determinism.md), so fingerprints leave them out."""


class SwitchGenerationConfig(StrictModel):
    """How a switched response is written."""

    patch_tokens: int = Field(50, gt=0, description="tokens per patch (the paper: 50)")
    max_new_tokens: int = Field(512, gt=0, description="token budget of one response")
    seed: int = 0
    truncate: Literal["error", "left"] = Field(
        "error",
        description="a prompt + max_new_tokens longer than a candidate's positions: error (refuse, naming "
        "the trace) or left (keep the prompt's last tokens)",
    )
    schedule: Schedule = Field(
        "auto",
        description="which traces share a forward pass (simulate, eval, rl rollouts, the vector env): auto "
        "(per pass, by a cost measured at start-up), grouped (one candidate per engine and pass) or "
        "lockstep (every waiting row at once); float32 records are the same under each",
    )
    max_inflight_bytes: int | None = Field(
        None,
        gt=0,
        description="admit traces while the estimated KV cache of those in flight (prompt + max_new_tokens "
        "per trace, per candidate with a cache here; a fork's shared prefix once) fits in this many bytes; "
        "null: no limit",
    )

    def scheduling(self) -> dict[str, Any]:
        """The keyword arguments of :func:`switchrl.rollout.advance` and the other generation loops that
        :data:`SCHEDULING` sets."""
        return {"schedule": self.schedule, "max_inflight_bytes": self.max_inflight_bytes}


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """``config.yaml: candidates.0.path: Field required; ...`` from a pydantic error."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if e["type"] == "value_error":  # our own validators' messages, without pydantic's "Value error, "
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(parts)


def parse(model: type[M], data: Any, source: str | None = None) -> M:
    """Validate ``data`` into ``model``, raising :class:`ConfigError` with every bad key named."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Read a YAML file and validate it into ``model``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return parse(model, data, str(path))


class SwitcherConfig(StrictModel):
    """Which policy picks the next author."""

    type: Literal["random", "fixed", "round_robin", "lm"] = "random"
    candidate: str | None = Field(None, description="fixed: the candidate's name")
    path: str | None = Field(
        None, description="lm: a saved switcher directory (or a base model to wrap, untuned)"
    )
    top_p: float = Field(0.7, gt=0, le=1)
    greedy: bool = False
    seed: int = 0
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="the LM switcher's weights in every command that loads one (generate, eval, sft, rl); "
        "auto: bfloat16 on a GPU with bf16 support, else float32. sft and rl train in this precision",
    )
    device: str = Field(
        "auto",
        description="the LM switcher's device: auto (CUDA if present, else CPU) | cpu | cuda | cuda:N; "
        "auto and cuda are this rank's GPU (cuda:LOCAL_RANK) under accelerate launch",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device(v)


class TaskSourceConfig(StrictModel):
    """Where task instances come from: a JSONL file or the built-in testbed."""

    source: Literal["jsonl", "testbed"] = "jsonl"
    path: str | None = Field(None, description="jsonl: the task file")
    task: str | None = Field(None, description="task name (testbed: recall | arithmetic | compositional)")
    split: str | None = Field(
        None,
        description="the split of rows without a 'split' key (a row's own key wins; unset: they are test "
        "rows, and reading them for training is an error); testbed: only this split",
    )
    limit: int | None = Field(None, gt=0)
    allow_overlap: bool = Field(
        False,
        description="rows without a 'split' key feed every split (train and test): an intended overlap",
    )

    @model_validator(mode="after")
    def _one_split_rule(self) -> TaskSourceConfig:
        if self.allow_overlap and self.split is not None:
            raise ValueError("give either 'split' (rows without a key belong to it) or 'allow_overlap: true'")
        return self
