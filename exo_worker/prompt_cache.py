"""PromptCache: one instance's KV cache of earlier prompts, so a new prompt only processes new tokens.

It wraps mlx-lm's `LRUPromptCache` (the one `mlx_lm.server` uses): entries are keyed by the token
sequence their KV cache holds, and a lookup returns a copy of the entry sharing the longest common
prefix with the new prompt. When the prompt diverges inside a cached entry, the copy is trimmed back
to the common prefix, so even unrelated chats share their chat template's system prompt. The cache
is bounded by a byte budget, evicting the oldest entry first. Entries age by insertion; every
finished request inserts its whole sequence (prompt and answer) as a new entry and the library
drops the entries it extends, so a prefix that is still in use stays young.

Used only on the engine's MLX thread; `stats()` may be read from any thread (a locked snapshot).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import msgspec

from protocol.messages import PromptCacheStats

# The single model key: one PromptCache serves one model instance.
_MODEL_KEY = "model"
# Entries are also bounded in number, so many tiny sequences cannot grow the trie without end.
MAX_ENTRIES = 4096
_MIB = 1 << 20
_GIB = 1 << 30


def default_budget_bytes(instances: int = 1) -> int:
    """An eighth of the memory available now, shared by the worker's instances, 64 MiB to 8 GiB each.

    The KV cache of a long chat of a small model is a few MiB; a large model's is far bigger, which
    is why the budget scales with the machine rather than being a fixed count of entries.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES: take half the physical memory
        available = os.sysconf("SC_PHYS_PAGES") * page // 2
    share = available // 8 // max(1, instances)
    return int(min(max(share, 64 * _MIB), 8 * _GIB))


class PromptCache:
    """The per-instance prompt cache and its counters (hits, misses, reused tokens)."""

    def __init__(self, budget_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the prompt cache budget must be >= 0 bytes, got {budget_bytes}")
        from mlx_lm.models.cache import LRUPromptCache

        self.budget_bytes = budget_bytes
        self._cache = LRUPromptCache(max_size=max_entries, max_bytes=budget_bytes)
        self._lock = threading.Lock()
        self._stats = PromptCacheStats(budget_bytes=budget_bytes)

    def fetch(self, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """A KV cache holding the longest cached prefix of `prompt` (a copy), and that prefix's length.

        At least the prompt's last token is always left to process: generation starts from its logits.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache: list[Any] | None = None
        reused = 0
        if self.budget_bytes > 0 and prompt:
            cache, rest = self._cache.fetch_nearest_cache(_MODEL_KEY, prompt)
            if cache is not None and not rest:
                # An exact hit: step back one token so there is something to run the model on.
                if can_trim_prompt_cache(cache):
                    trim_prompt_cache(cache, 1)
                    rest = prompt[-1:]
                else:
                    cache, rest = None, prompt
            if cache is not None:
                reused = len(prompt) - len(rest)
        with self._lock:
            s = self._stats
            self._stats = msgspec.structs.replace(
                s,
                hits=s.hits + (reused > 0),
                misses=s.misses + (reused == 0),
                reused_tokens=s.reused_tokens + reused,
                prompt_tokens=s.prompt_tokens + len(prompt),
            )
        return (cache if reused > 0 else None), reused

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        """Keep the KV cache of `tokens` (the sequence it holds); evict the oldest entries past the budget."""
        if self.budget_bytes == 0 or not tokens or not cache:
            return
        self._cache.insert_cache(_MODEL_KEY, list(tokens), cache)
        self._refresh()

    def _refresh(self) -> None:
        with self._lock:
            self._stats = msgspec.structs.replace(
                self._stats, size_bytes=int(self._cache.nbytes), entries=len(self._cache)
            )

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return self._stats
