"""A candidate served by an OpenAI-compatible ``/v1/completions`` server (e.g. ``vllm serve``).

The prompt is sent as token ids (the candidate's view of the trace), so the server reads exactly
what an in-process candidate would; its prefix cache makes the re-sent prefix cheap. Returned tokens
are taken from vLLM's ``token_ids`` / ``return_tokens_as_token_ids`` extensions when present, and
otherwise re-tokenized from the text with the local tokenizer. Requests go over one pooled keep-alive
client per candidate (:mod:`switchrl.backends.http_client`), which retries transient failures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from switchrl.backends.base import CandidateSampling, Patch, StopReason, Trace
from switchrl.backends.http_client import JSONClient, RetryPolicy, ServerError
from switchrl.backends.tokens import TokenizedCandidate, load_tokenizer

_TOKEN_ID_PREFIX = "token_id:"


class OpenAIBackend(TokenizedCandidate):
    """Writes patches through ``POST {base_url}/completions`` with token-id prompts.

    Greedy candidates send one request per step with every trace in the ``prompt`` list (chunks of
    ``max_batch``). The completions API has one ``seed`` per request, so sampling candidates send one
    request per trace, seeded by (seed, trace key, patch index, name), ``max_concurrency`` at a time;
    the server batches them. ``vllm_extensions`` adds vLLM's request fields (``top_k``,
    ``return_token_ids``, ``return_tokens_as_token_ids``, ``include_stop_str_in_output``,
    ``skip_special_tokens``); turn it off for servers that reject unknown fields.

    ``timeout`` bounds each attempt of a request; one that meets HTTP 429 or 5xx, a timeout or a lost
    connection is sent again up to ``max_retries`` times, ``retry_backoff`` seconds after the first
    failure and twice as long after each further one. ``api_key`` (default: the ``OPENAI_API_KEY``
    environment variable) goes out as a bearer token. :meth:`close` closes the pooled connections.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        served_model: str,
        tokenizer: PreTrainedTokenizerBase,
        sampling: CandidateSampling | None = None,
        chat_template: bool = False,
        prompt_template: str = "{query}",
        stop_strings: Sequence[str] = (),
        generation_config: object | None = None,
        timeout: float = 300.0,
        max_batch: int = 256,
        max_concurrency: int = 32,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        api_key: str | None = None,
        vllm_extensions: bool = True,
    ):
        super().__init__(
            name, tokenizer, sampling, chat_template, prompt_template, stop_strings, generation_config
        )
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"candidate {name!r}: base_url must start with http:// or https://, got {base_url!r}"
            )
        if not served_model:
            raise ValueError(f"candidate {name!r}: served_model must name the model the server serves")
        for field, value in (
            ("timeout", timeout),
            ("max_batch", max_batch),
            ("max_concurrency", max_concurrency),
        ):
            if value <= 0:
                raise ValueError(f"candidate {name!r}: {field} must be > 0, got {value}")
        try:
            retry = RetryPolicy(max_retries, retry_backoff)
        except ValueError as err:
            raise ValueError(f"candidate {name!r}: {err}") from None
        self.base_url = base_url.rstrip("/")
        self.served_model = served_model
        self.max_batch = max_batch
        self.max_concurrency = max_concurrency
        self.vllm_extensions = vllm_extensions
        self.http = JSONClient(
            self.base_url,
            f"candidate {name!r}",
            "completions server",
            timeout=timeout,
            max_connections=max_concurrency,
            retry=retry,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or None,
        )

    @classmethod
    def from_pretrained(
        cls, name: str, path: str, base_url: str, served_model: str | None = None, **kwargs
    ) -> OpenAIBackend:
        """Tokenizer (and EOS ids) from the local checkpoint ``path``; tokens from the server at ``base_url``."""
        tokenizer = load_tokenizer(path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        backend = cls(
            name, base_url, served_model or path, tokenizer, generation_config=generation_config, **kwargs
        )
        try:  # the checkpoint's positions (the server may serve fewer; then its own error applies)
            backend.max_positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        except Exception:  # noqa: BLE001 - a tokenizer-only directory: no limit known here
            backend.max_positions = None
        return backend

    # ------------------------------------------------------------------ requests
    def _body(self, prompts: list[list[int]], max_tokens: int, seed: int | None) -> dict:
        s = self.sampling
        body: dict = {
            "model": self.served_model,
            "prompt": prompts,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if seed is not None:
            body["seed"] = seed
        if self.stop_strings:
            body["stop"] = list(self.stop_strings)
        if self.vllm_extensions:
            body.update(
                return_token_ids=True,
                return_tokens_as_token_ids=True,
                logprobs=0,
                include_stop_str_in_output=True,
                skip_special_tokens=True,
            )
            if s.top_k:
                body["top_k"] = s.top_k
        return body

    def _complete(self, prompts: list[list[int]], max_tokens: int, seed: int | None) -> list[dict]:
        """The choice for each prompt, in prompt order."""
        answer = self.http.post("completions", self._body(prompts, max_tokens, seed))
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise ServerError(
                f"candidate {self.name!r}: {self.base_url} answered {len(choices or [])} choices "
                f"for {len(prompts)} prompts: {str(answer)[:300]}"
            )
        return sorted(choices, key=lambda c: c.get("index", 0))

    def _choice_tokens(self, choice: dict) -> tuple[list[int], StopReason | None]:
        """The written ids (no trailing EOS) and why the patch ended, from one choice."""
        ids = choice.get("token_ids")
        if ids is None:
            tokens = (choice.get("logprobs") or {}).get("tokens")
            if tokens and all(isinstance(t, str) and t.startswith(_TOKEN_ID_PREFIX) for t in tokens):
                ids = [int(t[len(_TOKEN_ID_PREFIX) :]) for t in tokens]
            else:
                ids = self.tokenizer(choice.get("text", ""), add_special_tokens=False)["input_ids"]
        return self._finished(ids, choice.get("finish_reason"), choice.get("stop_reason"))

    def close(self) -> None:
        """Close the connections to the server (idempotent); the backend cannot write afterwards."""
        self.http.close()

    # ------------------------------------------------------------------ the backend protocol
    def write_patches(
        self, traces: Sequence[Trace], author: int, patch_tokens: int, seed: int
    ) -> list[Patch]:
        limits = self._patch_limits(traces, patch_tokens)
        if not traces:
            return []
        start = time.perf_counter()
        views = [self.view(t) for t in traces]
        if self.sampling.greedy:
            calls = [(rows, limits[rows[0]], None) for rows in self._greedy_batches(limits)]
        else:
            calls = [([i], limits[i], self._patch_seed(seed, t)) for i, t in enumerate(traces)]
        with ThreadPoolExecutor(min(self.max_concurrency, len(calls))) as pool:
            answers = list(pool.map(lambda c: self._complete([views[i] for i in c[0]], c[1], c[2]), calls))
        choices: list[dict] = [{}] * len(traces)
        for (rows, _, _), answer in zip(calls, answers):
            for i, choice in zip(rows, answer):
                choices[i] = choice
        seconds = (time.perf_counter() - start) / len(traces)
        patches = []
        for trace, limit, choice in zip(traces, limits, choices):
            ids, reason = self._choice_tokens(choice)
            ids, reason = self._cut_at_stop(trace, ids[:limit], reason)
            patches.append(self.patch_from_ids(trace, author, ids, reason, seconds))
        return patches

    def _greedy_batches(self, limits: list[int]) -> list[list[int]]:
        """Rows grouped by token limit (one ``max_tokens`` per request), at most ``max_batch`` each."""
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(limits):
            groups.setdefault(n, []).append(i)
        return [
            rows[j : j + self.max_batch]
            for rows in groups.values()
            for j in range(0, len(rows), self.max_batch)
        ]
