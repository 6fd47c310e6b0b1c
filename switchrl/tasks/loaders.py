"""Load task instances from JSONL files or Hugging Face datasets, and save them back.

The JSONL task format: one JSON object per line (blank lines are skipped)::

    {"id": "gsm8k-0", "query": "Natalia sold 48 clips ...", "reference": "72", "task": "gsm8k"}
    {"query": "Which is a prime? (A) 4 (B) 7", "reference": "B", "choices": 2}

* ``query`` (required): a non-empty string.
* ``reference`` (required): a string or a number (numbers are stored as their text); may be ``""``.
* ``id`` (optional): a string or an integer; without it, the 1-based line number. Unique per task.
* ``task`` (optional): the task name; without it, the loader's ``task`` argument, else ``"default"``.
* any other key goes to ``TaskInstance.meta`` and reaches the scorer as a keyword argument.

The field names of query, reference and id can be changed with the loaders' ``*_field`` arguments.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from switchrl.errors import SwitchRLError
from switchrl.tasks.base import TaskInstance

__all__ = [
    "TaskFileError",
    "TaskFileNotFound",
    "check_task_file",
    "load_hf_dataset",
    "load_jsonl",
    "save_jsonl",
]

_FIELDS = ("id", "query", "reference", "task")
_HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class TaskFileError(SwitchRLError, ValueError):
    """A task file or dataset row is malformed; the message names the file and line (or row)."""


class TaskFileNotFound(TaskFileError, FileNotFoundError):
    """A task file that does not exist (also a ``FileNotFoundError``, as it was before)."""


def check_task_file(path: str | os.PathLike[str], where: str | None = None) -> Path:
    """``path`` as a :class:`Path` if it is a file, else :class:`TaskFileNotFound` naming it and the fix
    (``where``: the config key to name, e.g. ``tasks.0.path``)."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        prefix = f"{where}: " if where else ""
        raise TaskFileNotFound(
            f"{prefix}task file not found: {path} ({what}); fix the path (a relative path is read from "
            f"{os.getcwd()})"
        )
    return path


class _Reader:
    """Turns records into :class:`TaskInstance` objects with shared field checks and duplicate detection."""

    def __init__(self, task: str | None, query_field: str, reference_field: str, id_field: str) -> None:
        for name, value in (
            ("query_field", query_field),
            ("reference_field", reference_field),
            ("id_field", id_field),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if task is not None and (not isinstance(task, str) or not task.strip()):
            raise ValueError(f"task must be a non-empty string or None, got {task!r}")
        self.task = task or "default"
        self.query_field, self.reference_field, self.id_field = query_field, reference_field, id_field
        self.seen: dict[tuple[str, str], str] = {}

    def read(self, record: Any, where: str, default_id: str) -> TaskInstance:
        if not isinstance(record, Mapping):
            raise TaskFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if self.query_field not in record:
            raise TaskFileError(f"{where}: missing field {self.query_field!r}")
        query = record[self.query_field]
        if not isinstance(query, str):
            raise TaskFileError(
                f"{where}: field {self.query_field!r} must be a string, got {type(query).__name__}"
            )
        if not query.strip():
            raise TaskFileError(f"{where}: field {self.query_field!r} is empty")
        if self.reference_field not in record:
            raise TaskFileError(f'{where}: missing field {self.reference_field!r} (use "" if there is none)')
        reference = _text(record[self.reference_field], self.reference_field, where)
        raw_id = record.get(self.id_field)
        uid = default_id if raw_id is None else _text(raw_id, self.id_field, where, numbers=(int,))
        if not uid.strip():
            raise TaskFileError(f"{where}: field {self.id_field!r} is empty")
        task = record.get("task", self.task)
        if not isinstance(task, str) or not task.strip():
            raise TaskFileError(f"{where}: field 'task' must be a non-empty string, got {task!r}")
        if (task, uid) in self.seen:
            raise TaskFileError(
                f"{where}: duplicate id {uid!r} in task {task!r} (first at {self.seen[task, uid]})"
            )
        self.seen[task, uid] = where
        reserved = {self.query_field, self.reference_field, self.id_field, "task"}
        meta = {k: v for k, v in record.items() if k not in reserved}
        return TaskInstance(id=uid, query=query, reference=reference, task=task, meta=meta)


def _text(value: Any, field: str, where: str, numbers: tuple[type, ...] = (int, float)) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers) and not isinstance(value, bool):
        return str(value)
    kinds = "a string or an integer" if numbers == (int,) else "a string or a number"
    raise TaskFileError(f"{where}: field {field!r} must be {kinds}, got {type(value).__name__}")


def load_jsonl(
    path: str | os.PathLike[str],
    task: str | None = None,
    query_field: str = "query",
    reference_field: str = "reference",
    id_field: str = "id",
) -> list[TaskInstance]:
    """Read a JSONL task file (format in the module docstring).

    Raises :class:`TaskFileError` naming the file (a missing file: :class:`TaskFileNotFound`, also a
    ``FileNotFoundError``) or ``file:line`` for bad JSON, a missing or non-string field, an empty query,
    a duplicate id, or a file with no records.
    """
    path = check_task_file(path)
    reader = _Reader(task, query_field, reference_field, id_field)
    instances = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFileError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            instances.append(reader.read(record, where, default_id=str(lineno)))
    if not instances:
        raise TaskFileError(f"{path}: no task instances (the file is empty)")
    return instances


def save_jsonl(instances: Iterable[TaskInstance], path: str | os.PathLike[str]) -> Path:
    """Write ``instances`` as a JSONL task file that :func:`load_jsonl` reads back unchanged.

    Written atomically (a temporary file in the same directory, then ``os.replace``): readers see
    the old file or the complete new one. Meta keys may not be ``id``/``query``/``reference``/``task``
    and meta values must be JSON-serialisable. Returns the path.
    """
    path = Path(path)
    lines, seen = [], set()
    for inst in instances:
        if not isinstance(inst, TaskInstance):
            raise TypeError(f"save_jsonl expects TaskInstance objects, got {type(inst).__name__}")
        if (inst.task, inst.id) in seen:
            raise ValueError(f"duplicate id {inst.id!r} in task {inst.task!r}")
        seen.add((inst.task, inst.id))
        clash = sorted(set(inst.meta) & set(_FIELDS))
        if clash:
            raise ValueError(f"task instance {inst.id!r}: meta keys {clash} clash with the record fields")
        record = {
            "id": inst.id,
            "task": inst.task,
            "query": inst.query,
            "reference": inst.reference,
            **inst.meta,
        }
        try:
            lines.append(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError) as err:
            raise ValueError(f"task instance {inst.id!r}: meta is not JSON-serialisable: {err}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_hf_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    query_field: str = "query",
    reference_field: str = "reference",
    id_field: str = "id",
    task: str | None = None,
    **load_kwargs: Any,
) -> list[TaskInstance]:
    """Task instances from a Hugging Face dataset, with the same field rules as :func:`load_jsonl`.

    ``name_or_path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
    a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, or anything ``datasets.load_dataset``
    accepts (a hub name such as ``"openai/gsm8k"`` with ``name="main"`` in ``load_kwargs``; hub names
    need network access and fail under ``HF_HUB_OFFLINE=1`` unless cached). ``split`` picks the split
    of a ``DatasetDict`` (a saved single ``Dataset`` has none). Rows without an id get their 0-based
    row index. E.g. GSM8K: ``load_hf_dataset("openai/gsm8k", "test", "question",
    "answer", name="main", task="gsm8k")`` (the ``numeric`` scorer reads the ``#### N`` reference).
    """
    import datasets  # heavy import, only when needed

    name = os.fspath(name_or_path)
    local = Path(name)
    reader = _Reader(task, query_field, reference_field, id_field)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise TaskFileError(f"{name}: no split {split!r}; available: {sorted(ds)}")
                ds = ds[split]
        elif local.is_file():
            builder = _HF_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise TaskFileError(
                    f"{name}: unsupported file type {local.suffix!r}; expected one of {sorted(_HF_BUILDERS)}"
                )
            ds = datasets.load_dataset(builder, data_files={split: name}, split=split, **load_kwargs)
        else:
            ds = datasets.load_dataset(name, split=split, **load_kwargs)
    except TaskFileError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types; name the dataset and the likely cause
        raise TaskFileError(
            f"cannot load dataset {name!r} (split {split!r}): {type(err).__name__}: {err}. Hub datasets need "
            "network access; offline, pass a local file or a save_to_disk directory"
        ) from err
    missing = [f for f in (query_field, reference_field) if f not in ds.column_names]
    if missing:
        raise TaskFileError(f"{name}[{split}]: missing column(s) {missing}; columns: {ds.column_names}")
    return [reader.read(row, f"{name}[{split}] row {i}", default_id=str(i)) for i, row in enumerate(ds)]
