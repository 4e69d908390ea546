"""How much memory one instance of a model needs, from what its node reports about the model files.

need = weights + KV headroom, where
    weights   = bytes of the weight files as loaded, plus the runtime's overhead (the worker
                estimates it from the files: see exo_worker.local_models)
    KV        = kv_bytes_per_token x context_tokens x max_concurrency: a full context for every
                slot the placement asks for. kv_bytes_per_token comes from config.json
                (2 x num_hidden_layers x num_key_value_heads x head_dim x bytes per element).
It is deliberately pessimistic: a placement that fits on paper must not run the node out of memory
when every slot holds a long conversation.
"""

from __future__ import annotations

from protocol.messages import LocalModel

DEFAULT_CONTEXT_TOKENS = 4096


def instance_need(
    model: LocalModel, max_concurrency: int, context_tokens: int = DEFAULT_CONTEXT_TOKENS
) -> int:
    weights = model.weights_bytes or model.size_bytes
    return weights + model.kv_bytes_per_token * context_tokens * max_concurrency


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
