"""Stop strings: where a response's text first contains one, found for a whole batch at once.

A row stops at the first token after which its response text (the tail already written before this
patch, then the new tokens) contains a stop string that ends in the new text. :class:`StopScan` finds
that token for every row with one batched decode every :data:`CHECK_EVERY` tokens (no device sync or
decode per row and token); decoding is rolled back to the stopping token, so the tokens and stop
positions are those of a check after every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

CHECK_EVERY = 8  # decode steps between two checks (a stopped row runs at most this many tokens more)
_INCOMPLETE = "\ufffd"  # what a decode shows for the bytes of a character not yet complete


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The text of ``ids`` as every reader sees it (special tokens dropped, no space clean-up)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def complete(text: str) -> str:
    """``text`` without a trailing incomplete character (its bytes come with the next tokens)."""
    return text.rstrip(_INCOMPLETE)


def splits_character(text: str) -> bool:
    """Whether ``text`` (the decode of some tokens alone) starts or ends inside a character."""
    return text.startswith(_INCOMPLETE) or text.endswith(_INCOMPLETE)


def find_stop(text: str, stop_strings: Sequence[str], after: int) -> tuple[int, int] | None:
    """(start, end) of the stop string in ``text`` that ends first, among those ending after ``after``."""
    best: tuple[int, int] | None = None
    for s in stop_strings:
        at = text.find(s, max(0, after - len(s) + 1))
        if at >= 0 and (best is None or at + len(s) < best[1]):
            best = (at, at + len(s))
    return best


def stop_prefix_length(text: str, stop_strings: Sequence[str], at_most: int) -> int:
    """The length (at most ``at_most``) of the longest end of ``text`` that begins a stop string."""
    longest = max((len(s) for s in stop_strings), default=0)
    for n in range(min(at_most, longest - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop_strings):
            return n
    return 0


@dataclass
class RowStops:
    """One row's stop strings, and the tokens of its response before this patch that it reads with them."""

    tokenizer: PreTrainedTokenizerBase
    stop_strings: tuple[str, ...]
    context: list[int]


class StopScan:
    """Finds, for the rows that have stop strings, the token after which each first contains one.

    :meth:`scan` takes every row's tokens written so far and returns {row: tokens to keep} for the rows
    that stopped since the last scan; each row's new tokens are decoded once per scan, in one batch
    per tokenizer, and only a row with a match is decoded again to find the exact token.
    """

    def __init__(self, rows: Sequence[RowStops | None]):
        self.rows = list(rows)
        self.scanned = [0] * len(self.rows)
        self.before: list[int] = [0] * len(self.rows)  # characters of the context, complete ones only
        for tokenizer, members in self._by_tokenizer(range(len(self.rows))):
            texts = tokenizer.batch_decode(
                [self.rows[r].context for r in members],
                skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
            for r, text in zip(members, texts):
                self.before[r] = len(complete(text))

    @classmethod
    def of(cls, rows: Sequence[RowStops | None]) -> StopScan | None:
        """A scan of ``rows``, or None when no row has a stop string (decoding then never leaves tensors)."""
        return cls(rows) if any(r is not None and r.stop_strings for r in rows) else None

    def _by_tokenizer(self, rows: Sequence[int]) -> list[tuple[PreTrainedTokenizerBase, list[int]]]:
        """The rows with stop strings among ``rows``, grouped by tokenizer (one batched decode each)."""
        groups: dict[int, tuple[PreTrainedTokenizerBase, list[int]]] = {}
        for r in rows:
            stops = self.rows[r]
            if stops is not None and stops.stop_strings:
                groups.setdefault(id(stops.tokenizer), (stops.tokenizer, []))[1].append(r)
        return list(groups.values())

    def _hit(self, row: int, text: str) -> bool:
        return find_stop(text, self.rows[row].stop_strings, self.before[row]) is not None

    def scan(self, tokens: Sequence[Sequence[int]]) -> dict[int, int]:
        """{row: how many of its ``tokens`` to keep} for each row whose tokens now contain a stop string."""
        fresh = [r for r in range(len(self.rows)) if len(tokens[r]) > self.scanned[r]]
        stops: dict[int, int] = {}
        for tokenizer, members in self._by_tokenizer(fresh):
            texts = tokenizer.batch_decode(
                [[*self.rows[r].context, *tokens[r]] for r in members],
                skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
            for r, text in zip(members, texts):
                if self._hit(r, text):
                    context = self.rows[r].context
                    stops[r] = next(
                        n
                        for n in range(self.scanned[r] + 1, len(tokens[r]) + 1)
                        if self._hit(r, decode(tokenizer, [*context, *tokens[r][:n]]))
                    )
        for r in fresh:
            self.scanned[r] = len(tokens[r])
        return stops


def stop_rows(
    scan: StopScan,
    written: torch.Tensor,
    lengths: torch.Tensor,
    hit_eos: torch.Tensor,
    hit_stop: torch.Tensor,
    active: torch.Tensor,
    mask: torch.Tensor,
    first_col: int,
) -> None:
    """End the rows of a decode loop whose tokens now hold a stop string at that token (``lengths``,
    flags) and drop from the attention ``mask`` what they read after it (``first_col``: the column of
    the first sampled token), so the cache keeps all but the last kept token, as when checked every token."""
    rows = [row[:n] for row, n in zip(written.tolist(), lengths.tolist())]
    for r, n in scan.scan(rows).items():
        lengths[r], hit_stop[r], hit_eos[r], active[r] = n, True, False, False
        mask[r, first_col + n - 1 :] = 0


StopIdSets = frozenset[int] | Sequence[frozenset[int]]


class StopIds:
    """The stop ids of a batch's rows as tensors: their union ``ids`` [S] and, when rows differ (fused
    candidates with different EOS ids), ``mask`` [B, S], True where row ``b`` stops on ``ids[s]``.

    ``stop_ids`` is one set for every row or one set per row.
    """

    def __init__(self, stop_ids: StopIdSets, batch: int, device: torch.device):
        per_row = [stop_ids] * batch if isinstance(stop_ids, (set, frozenset)) else list(stop_ids)
        if len(per_row) != batch:
            raise ValueError(f"got {batch} rows but {len(per_row)} sets of stop ids")
        union = sorted(set().union(*per_row))
        self.ids = torch.tensor(union, dtype=torch.long, device=device)
        self.mask: torch.Tensor | None = None
        if len(set(per_row)) > 1:
            rows = [[i in row for i in union] for row in per_row]
            self.mask = torch.tensor(rows, dtype=torch.bool, device=device)

    def __bool__(self) -> bool:
        return self.ids.numel() > 0

    def hits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B] bool: whether each row's token in ``tokens`` [B] is one of that row's stop ids."""
        if self.mask is None:
            return torch.isin(tokens, self.ids)
        return ((tokens[:, None] == self.ids[None, :]) & self.mask).any(dim=-1)

    def ban(self, logits: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """``logits`` [B, V] with each of ``rows``' own stop ids set to -inf (a copy)."""
        logits = logits.clone()
        at = torch.tensor(list(rows), device=logits.device)[:, None], self.ids[None, :]
        if self.mask is None:
            logits[at] = float("-inf")
        else:
            logits[at] = logits[at].masked_fill(self.mask[at[0].squeeze(1)], float("-inf"))
        return logits
