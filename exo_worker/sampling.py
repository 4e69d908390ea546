"""Per-request samplers for batched generation.

A batch step calls each request's sampler on that request's row of log-probabilities, so requests
with different temperature, top_p and seed share one batch. Greedy requests share one sampler object,
which lets mlx-lm sample all of them in a single call when the whole batch is greedy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

Sampler = Callable[[Any], Any]


@functools.cache
def _greedy() -> Sampler:
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=0.0)


def make_request_sampler(
    temperature: float, top_p: float, seed: int | None, top_k: int | None = None
) -> Sampler:
    from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_sampler

    if temperature == 0:
        return _greedy()
    if seed is None:
        return make_sampler(temp=temperature, top_p=top_p, top_k=top_k or 0)
    # make_sampler draws from MLX's global generator; a seed there would be disturbed by every other
    # request in the batch and every other engine in this process. So a seeded request gets the
    # same filtering and draw, with its own key split once per token.
    import mlx.core as mx

    key = mx.random.key(seed)

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, subkey = mx.random.split(key)
        if top_k and 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=subkey)

    return sample
