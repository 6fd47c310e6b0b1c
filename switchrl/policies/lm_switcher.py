"""``LMSwitcher``: a causal LM (optionally with a LoRA adapter) that picks who writes the next patch.

The switcher reads the single sequence format of :mod:`switchrl.policies.sequence` and decides by
the logits of the candidates' label tokens only (softmax over them, then top-p; no free text, so no
parse failures). Decisions are batched over traces, and with the default format each trace keeps
its KV cache, so a decision costs one forward pass over the tokens added since the last one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from transformers import PreTrainedTokenizerBase

from switchrl.backends.base import CandidateSampling, Trace
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.sampler import sample_next
from switchrl.backends.tokens import load_tokenizer
from switchrl.backends.transformers_backend import load_causal_lm
from switchrl.config import StrictModel, format_validation_error
from switchrl.errors import CheckpointError, ConfigError
from switchrl.policies.label_tokens import add_label_tokens, label_row_modules
from switchrl.policies.sequence import PromptFormat, SwitchSequence, default_label_tokens
from switchrl.rollout import Decision
from switchrl.utils.seeding import generator

METADATA_FILE = "switchrl_switcher.json"
FORMAT_VERSION = 1


class SavedSwitcherConfig(StrictModel):
    """What ``switchrl_switcher.json`` records next to a saved switcher."""

    format_version: int = FORMAT_VERSION
    candidate_names: list[str] = Field(min_length=1)
    label_tokens: list[str]
    patch_tokens: int = Field(gt=0)
    prompt_format: PromptFormat = "switchrl"
    instruction: str
    chat_template: bool = False
    base_model_path: str | None = None
    adapter: bool = False
    top_p: float = Field(0.7, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    greedy: bool = False
    seed: int = 0
    aligned_first_last: bool = False


def read_metadata(directory: Path) -> SavedSwitcherConfig:
    """The ``switchrl_switcher.json`` of a saved switcher (read without loading any weights)."""
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} is not a saved switcher: {METADATA_FILE} is missing")
    try:
        meta = SavedSwitcherConfig.model_validate(json.loads(meta_path.read_text()))
    except (ValidationError, json.JSONDecodeError) as err:
        msg = format_validation_error(err, str(meta_path)) if isinstance(err, ValidationError) else str(err)
        raise CheckpointError(f"{meta_path}: invalid switcher metadata: {msg}") from None
    if meta.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format_version {meta.format_version} is not supported "
            f"(this switchrl reads {FORMAT_VERSION})"
        )
    return meta


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


class LMSwitcher:
    """A switcher policy over ``candidate_names`` backed by a causal LM (implements ``SwitchPolicy``).

    Args:
        model: a causal LM or a peft model wrapping one.
        tokenizer: its tokenizer; missing label tokens are added (see :func:`add_label_tokens`).
        candidate_names: the candidates, in action order.
        label_tokens: one token per candidate (default ``<c0>``, ``<c1>``, ...).
        prompt_format: ``"switchrl"`` (default) or ``"reference"`` (the released PFA switchers' prompt).
        instruction, chat_template: see :class:`SwitchSequence`.
        top_p: nucleus over the label distribution (the paper: 0.7); ``greedy`` takes the argmax.
        temperature: divides the label logits before the softmax.
        seed: decisions draw from ``(seed, trace key, patch index)``.
        patch_tokens: the patch size the switcher is meant for (recorded in the metadata).
        aligned_first_last: the reference's rule that the last candidate (the aligned model) writes
            the first patch and the patch that reaches the token budget.
        base_model_path: where the base model comes from (recorded so an adapter can be reloaded).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        candidate_names: Sequence[str],
        *,
        label_tokens: Sequence[str] | None = None,
        prompt_format: PromptFormat = "switchrl",
        instruction: str | None = None,
        chat_template: bool = False,
        top_p: float = 0.7,
        temperature: float = 1.0,
        greedy: bool = False,
        seed: int = 0,
        patch_tokens: int = 50,
        aligned_first_last: bool = False,
        base_model_path: str | None = None,
    ):
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if patch_tokens <= 0:
            raise ConfigError(f"patch_tokens must be > 0, got {patch_tokens}")
        if prompt_format == "switchrl":
            label_tokens = (
                list(label_tokens) if label_tokens is not None else default_label_tokens(len(candidate_names))
            )
            add_label_tokens(model, tokenizer, label_tokens)
        self.sequence = SwitchSequence(
            tokenizer, candidate_names, label_tokens, prompt_format, instruction, chat_template
        )
        self.model, self.tokenizer = model, tokenizer
        self.top_p, self.temperature, self.greedy, self.seed = top_p, temperature, greedy, seed
        self.patch_tokens, self.aligned_first_last, self.base_model_path = (
            patch_tokens,
            aligned_first_last,
            base_model_path,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.lm = CachedLM(model, pad_token_id=pad if pad is not None else 0)
        self._label_index = torch.tensor(self.sequence.label_ids)
        self._views: dict[str, tuple[str, int, list[int]]] = {}  # key -> (query, patches covered, ids)
        self._last: dict[str, torch.Tensor] = {}  # key -> label logits after everything read so far

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        path: str,
        candidate_names: Sequence[str],
        *,
        adapter: str | None = None,
        lora: Any = None,
        dtype: str = "auto",
        device: str = "cpu",
        **kwargs: Any,
    ) -> LMSwitcher:
        """A switcher on the causal LM at ``path``; with ``adapter`` (a peft adapter directory) loaded on
        top, or with a fresh trainable LoRA adapter from ``lora`` (a ``peft.LoraConfig`` or its kwargs)."""
        if adapter is not None and lora is not None:
            raise ConfigError("give either adapter (a saved adapter) or lora (a new one), not both")
        tokenizer = load_tokenizer(path)
        model = load_causal_lm(path, dtype, device)
        switcher = cls(model, tokenizer, candidate_names, base_model_path=str(path), **kwargs)
        if adapter is not None or lora is not None:
            switcher.attach_adapter(adapter, lora)
        return switcher

    def attach_adapter(self, adapter: str | None, lora: Any) -> None:
        """Wrap the model in a peft model: the saved ``adapter`` directory, or a fresh LoRA from ``lora``."""
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter is not None:
            model = PeftModel.from_pretrained(self.model, adapter)
        else:
            config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
            if config.trainable_token_indices is None and self.sequence.prompt_format == "switchrl":
                # LoRA alone cannot separate label rows that pretraining never trained (their logit gap is
                # bounded by the rows' distance), so the label rows of the embeddings are trained too.
                config.trainable_token_indices = label_row_modules(self.model, self.sequence.label_ids)
            model = get_peft_model(self.model, config)
        self.model = model
        self.lm = CachedLM(model, pad_token_id=self.lm.pad_token_id)
        self.reset_cache()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        *,
        base_model_path: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        **overrides: Any,
    ) -> LMSwitcher:
        """Restore a switcher written by :meth:`save_pretrained` (``overrides``: e.g. ``greedy``, ``seed``)."""
        directory = Path(directory)
        meta = read_metadata(directory)
        kwargs = meta.model_dump(exclude={"format_version", "adapter", "candidate_names", "base_model_path"})
        kwargs.update(overrides)
        tokenizer = load_tokenizer(str(directory))
        if not meta.adapter:
            model = load_causal_lm(str(directory), dtype, device)
            return cls(model, tokenizer, meta.candidate_names, base_model_path=meta.base_model_path, **kwargs)
        base = base_model_path or meta.base_model_path
        if not base:
            raise CheckpointError(
                f"{directory / METADATA_FILE}: the adapter's base_model_path is unknown; pass base_model_path="
            )
        switcher = cls(
            load_causal_lm(base, dtype, device),
            tokenizer,
            meta.candidate_names,
            base_model_path=base,
            **kwargs,
        )
        switcher.attach_adapter(str(directory), None)
        return switcher

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the adapter (or the full model), the tokenizer and ``switchrl_switcher.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter = is_peft_model(self.model)
        if adapter and not self.base_model_path:
            raise CheckpointError("cannot save an adapter without base_model_path (needed to reload it)")
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = SavedSwitcherConfig(
            candidate_names=self.sequence.candidate_names,
            label_tokens=self.sequence.label_tokens,
            patch_tokens=self.patch_tokens,
            prompt_format=self.sequence.prompt_format,
            instruction=self.sequence.instruction,
            chat_template=self.sequence.chat_template,
            base_model_path=self.base_model_path,
            adapter=adapter,
            top_p=self.top_p,
            temperature=self.temperature,
            greedy=self.greedy,
            seed=self.seed,
            aligned_first_last=self.aligned_first_last,
        )
        tmp = directory / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(meta.model_dump(), indent=2))
        tmp.replace(directory / METADATA_FILE)  # written last: a directory with it is complete
        return directory

    # ------------------------------------------------------------------ the SwitchPolicy protocol
    @property
    def n_candidates(self) -> int:
        return self.sequence.n_candidates

    @property
    def candidate_names(self) -> list[str]:
        return self.sequence.candidate_names

    def decide(self, traces: Sequence[Trace]) -> list[Decision]:
        """One decision per trace: sampled (top-p) or greedy over the label tokens' distribution."""
        if not traces:
            return []
        logits = self.label_logits(traces) / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.greedy:
            actions = logits.argmax(dim=-1).tolist()
        else:
            uniforms = torch.tensor(
                [
                    float(torch.rand((), generator=generator(self.seed, t.key, len(t.patches), "lm-switch")))
                    for t in traces
                ]
            )
            actions = sample_next(logits, CandidateSampling(1.0, self.top_p), uniforms).tolist()
        out = []
        for t, a, p in zip(traces, actions, probs.tolist()):
            out.append(Decision(self.n_candidates - 1 if self.forces(t) else int(a), tuple(p)))
        return out

    def forces(self, trace: Trace, j: int | None = None) -> bool:
        """Whether the ``aligned_first_last`` rule takes decision ``j`` of ``trace`` (default: the next
        one) out of the switcher's hands: the first patch, and the one that reaches the token budget."""
        if not self.aligned_first_last:
            return False
        j = len(trace.patches) if j is None else j
        used = sum(len(p.token_ids) for p in trace.patches[:j])
        return j == 0 or trace.max_new_tokens - used <= self.patch_tokens

    def release(self, keys: Sequence[str]) -> None:
        self.lm.release(keys)
        for key in keys:
            self._views.pop(key, None)
            self._last.pop(key, None)

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        """Let traces ``dst_keys`` start from what ``src_key`` has read (shares the KV cache)."""
        self.lm.fork(src_key, dst_keys)
        for key in dst_keys:
            for store in (self._views, self._last):
                if src_key in store:
                    store[key] = store[src_key]
                else:
                    store.pop(key, None)

    def reset_cache(self) -> None:
        """Forget every trace (e.g. after the weights changed during training)."""
        self.release(list(self._views) + list(self._last))
        self.lm = CachedLM(self.model, pad_token_id=self.lm.pad_token_id)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def label_logits(self, traces: Sequence[Trace]) -> torch.Tensor:
        """The label tokens' logits [B, n_candidates] (float32, CPU) for the next decision of each trace."""
        if len({t.key for t in traces}) != len(traces):
            raise ValueError("traces must have distinct keys")
        if not self.sequence.incremental:
            keys = [f"{t.key}\x1fdecision" for t in traces]  # a fresh cache, freed right after
            ids = [self.sequence.context_ids(t.query, t.patches) for t in traces]
            logits = self.lm.extend(keys, ids)[:, self._label_index.to(self.lm.device)].float().cpu()
            self.lm.release(keys)
            return logits
        rows, new = [], []
        for i, t in enumerate(traces):
            view = self._view(t)
            fresh = view[self.lm.cached_length(t.key) :]
            if fresh or t.key not in self._last:
                rows.append(i)
                new.append(fresh)
        if rows:
            logits = self.lm.extend([traces[i].key for i in rows], new)
            logits = logits[:, self._label_index.to(logits.device)].float().cpu()
            for i, row in zip(rows, logits):
                self._last[traces[i].key] = row
        return torch.stack([self._last[t.key] for t in traces])

    def _view(self, trace: Trace) -> list[int]:
        """The ids the switcher reads for ``trace``, extended incrementally (rebuilt if the key was reused)."""
        query, covered, ids = self._views.get(trace.key, (None, 0, None))
        if ids is None or query != trace.query or covered > len(trace.patches):
            self.release([trace.key])
            covered, ids = 0, self.sequence.prompt_ids(trace.query)
        elif covered < len(trace.patches):
            ids = list(ids)  # forks share the stored list
        for patch in trace.patches[covered:]:
            ids.extend(self.sequence.segment_ids(patch))
        self._views[trace.key] = (trace.query, len(trace.patches), ids)
        return ids

    def label_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_positions: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities over the candidates at each label position, with gradients (for training).

        ``input_ids``/``attention_mask``: [B, T] sequences (left or right padded); ``label_positions``:
        [B, P] indices of label tokens in ``input_ids`` (-1 = padding). Returns [B, P, n_candidates]:
        the log-softmax of the label logits predicted for that position (0 where padded). Gather with
        the actions for the log-probability of the chosen labels.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids and attention_mask must be [B, T] of one shape, got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if label_positions.dim() != 2 or label_positions.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"label_positions must be [B, P] with B={input_ids.shape[0]}, got {tuple(label_positions.shape)}"
            )
        valid = label_positions >= 0
        if bool((label_positions[valid] < 1).any() | (label_positions >= input_ids.shape[1]).any()):
            raise ValueError(
                "label_positions must be in 1..T-1 (a label is predicted from the token before it) or -1"
            )
        device = self.lm.device
        mask = attention_mask.to(device)
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=input_ids.to(device), attention_mask=mask, position_ids=position_ids
        ).logits
        label_logits = logits[:, :, self._label_index.to(device)]  # [B, T, n]
        index = (
            (label_positions.to(device).clamp(min=1) - 1).unsqueeze(-1).expand(-1, -1, label_logits.shape[-1])
        )
        logp = torch.log_softmax(label_logits.gather(1, index).float() / self.temperature, dim=-1)
        return logp * valid.to(device).unsqueeze(-1)
