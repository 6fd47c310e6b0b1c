"""Tasks: task instances and their loaders (JSONL task files, Hugging Face datasets)."""

from switchrl.tasks.base import TaskInstance
from switchrl.tasks.loaders import TaskFileError, load_hf_dataset, load_jsonl, save_jsonl

__all__ = ["TaskFileError", "TaskInstance", "load_hf_dataset", "load_jsonl", "save_jsonl"]
