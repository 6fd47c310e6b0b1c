"""The typed records that stages hand each other through files: a simulated state (simulate -> sft) and
an eval response (eval -> report).

A producer builds the model and stores ``record.model_dump(mode="json")`` (the shard store keeps plain
dicts; field order is the on-disk key order, so keep it); a consumer reads records back with
:func:`parse_record` / :func:`read_records`, so that a malformed record fails with one error naming
its file, its id and the bad fields instead of a ``KeyError`` deep inside training or rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from switchrl.backends.base import Patch, StopReason
from switchrl.config import StrictModel, format_validation_error
from switchrl.errors import CheckpointError
from switchrl.executors import ShardStore
from switchrl.executors.base import RECORD_ID_KEY

__all__ = [
    "EvalResponse",
    "PrefixPatch",
    "ResponsePatch",
    "SimulatedState",
    "parse_record",
    "read_records",
]


PROB_DIGITS = 6  # switcher probabilities in records; float noise across devices/threads is below this

R = TypeVar("R", bound=BaseModel)


class Record(StrictModel):
    """A stored record: unknown keys are errors and a record is not changed once built."""

    model_config = ConfigDict(frozen=True)


# ---------------------------------------------------------------------------------------------- simulate
class PrefixPatch(Record):
    """A patch of a simulated state's prefix: enough to encode it again for SFT."""

    author: int = Field(ge=0, description="index of the candidate that wrote it")
    text: str
    token_ids: list[int] = Field(description="in the author's tokenizer")
    vocab: str = Field(description="fingerprint of the author's tokenizer (readers reuse ids if equal)")

    @classmethod
    def of(cls, patch: Patch) -> PrefixPatch:
        return cls.model_validate(patch.to_dict(cls.model_fields))

    def to_patch(self) -> Patch:
        return Patch.from_dict(self.model_dump())


class SimulatedState(Record):
    """One labelled state of the switcher's SFT data (``switchrl simulate``'s shard records)."""

    id: str = Field(description="``task/query id/s<state>``: the item id the shard store keys on")
    task: str
    query_id: str
    state: int = Field(ge=0, description="which of the query's ``states_per_query`` states")
    query: str
    reference: str
    candidates: list[str] = Field(min_length=1, description="candidate names; indices below refer to them")
    prefix_text: str = Field(description="the text of the prefix patches")
    prefix: list[PrefixPatch] = Field(description="the random-switching prefix the switcher sees")
    next_patches: list[str] = Field(description="per candidate: the text of the next patch it wrote")
    utilities: list[float] = Field(description="per candidate: the mean score of its k finishes")
    counts: list[int] = Field(description="per candidate: how many finishes were scored")
    label: int = Field(ge=0, description="the SFT target: argmax of utilities")
    label_name: str = Field(description="the name of the label's candidate")
    tie: bool = Field(description="several candidates share the best utility (broken by the seed)")
    all_equal: bool = Field(description="every utility is equal: the state carries no signal")
    failures: int = Field(ge=0, description="finishes whose scorer raised (scored 0)")
    errors: list[str] = Field(description="up to three distinct scorer errors")
    switch_cost: float = Field(
        0.0, ge=0, description="charged per author change of a finish in ``utilities`` (simulate.switch_cost)"
    )
    switches: list[float] | None = Field(
        None, description="per candidate: mean author changes of its finished responses (with a switch_cost)"
    )

    @model_serializer(mode="wrap")
    def _without_unused_cost(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Records without a switch cost keep the keys they had before the option (same bytes on disk)."""
        data = handler(self)
        if self.switches is None and not self.switch_cost:
            data.pop("switch_cost", None)
            data.pop("switches", None)
        return data

    @model_validator(mode="after")
    def _per_candidate(self) -> SimulatedState:
        n = len(self.candidates)
        for name in ("next_patches", "utilities", "counts") + (("switches",) if self.switches else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} candidates")
        if self.label >= n:
            raise ValueError(f"label {self.label} is not a candidate index (0..{n - 1})")
        return self


# ---------------------------------------------------------------------------------------------- eval
class ResponsePatch(Record):
    """A patch of an eval response: who wrote it and how sure the switcher was."""

    author: int = Field(ge=0, description="index of the candidate that wrote it")
    name: str = Field(description="that candidate's name")
    text: str
    probs: list[float] | None = Field(
        description=f"the switcher's distribution when it chose the author ({PROB_DIGITS} digits), if any"
    )

    @classmethod
    def of(cls, patch: Patch, names: Sequence[str]) -> ResponsePatch:
        data = patch.to_dict(("author", "text", "probs"))
        if data["probs"] is not None:
            data["probs"] = [round(x, PROB_DIGITS) for x in data["probs"]]
        return cls(name=names[patch.author], **data)


class EvalResponse(Record):
    """One response of one system in ``switchrl eval`` (its shards and ``responses.jsonl``)."""

    id: str = Field(description="``system/seed/task/query id``: the trace key and the shard store's item id")
    system: str
    seed: int
    task: str
    query_id: str
    query: str
    reference: str
    text: str = Field(description="the whole response")
    score: float = Field(description="the task scorer's score (0 when it raised)")
    error: str | None = Field(description="the scorer's error, if it raised")
    num_tokens: int = Field(ge=0)
    num_switches: int = Field(ge=0, description="how often the author changed between patches")
    stop_reason: StopReason
    seconds: float = Field(ge=0, description="worker wall time per response of its batch")
    patches: list[ResponsePatch]


# ---------------------------------------------------------------------------------------------- reading
def parse_record(model: type[R], record: Mapping[str, Any] | R, where: str | Path) -> R:
    """``record`` as a ``model`` (an instance passes as it is); a malformed one raises one
    :class:`CheckpointError` naming ``where`` (its file), its id and every bad field."""
    try:
        return model.model_validate(record)
    except ValidationError as err:
        rid = record.get(RECORD_ID_KEY) if isinstance(record, Mapping) else None
        raise CheckpointError(
            f"{where}: record {rid!r} is not a valid {model.__name__}: {format_validation_error(err)}"
        ) from None


def read_records(model: type[R], store: ShardStore) -> list[R]:
    """Every record of ``store`` (in its order) as a ``model``; see :func:`parse_record`."""
    files = store.files()
    return [parse_record(model, rec, files[rec[RECORD_ID_KEY]]) for rec in store.records()]
