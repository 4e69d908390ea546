"""Loading this rank's shard of a model: tensor parallel with mlx-lm, pipeline parallel by our stage.

Tensor parallel is mlx-lm's own: `sharded_load(path, tensor_group=group)` loads the model lazily,
calls the model's `shard()` (attention heads and MLP columns split over the ranks, an all-reduce
after attention and after the MLP) and reads only this rank's slices.

Pipeline parallel: mlx-lm pipelines only a few model families (those with `PipelineMixin`), not
Llama. `PipelineStage` replaces a Llama-family model's inner `model` (embedding, layers, norm) by
the layers [start, end) of this rank. Rank r receives the hidden state from rank r-1, runs its
layers and sends the result to rank r+1; the last rank's result is then all-gathered, so every
rank computes the same logits and samples the same token (lockstep needs every rank to know the
token). Rank 0 starts from the token embedding. Only the local layers' weights are read: the
model is loaded lazily and the other layers are dropped before evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from exo_worker.distributed.topology import ShardSpec
from exo_worker.engine import ModelLoadError
from protocol.sharding import Sharding

log = structlog.get_logger(__name__)


def _stage_class() -> type:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.base import create_attention_mask

    class PipelineStage(nn.Module):
        """Layers [start, end) of a Llama-family model; activations flow from rank r to rank r+1."""

        def __init__(self, inner: Any, group: Any, start: int, end: int, recv_dtype: Any) -> None:
            super().__init__()
            self.recv_dtype = recv_dtype  # what the previous stage's layers output
            self.embed_tokens = inner.embed_tokens
            self.norm = inner.norm
            self.layers = inner.layers[start:end]
            self.sliding_window = getattr(inner, "sliding_window", None)
            self.group = group
            self.rank, self.size = group.rank(), group.size()
            self.start, self.end = start, end

        def __call__(self, inputs: Any, cache: Any = None, input_embeddings: Any = None) -> Any:
            h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
            if cache is None:
                cache = [None] * len(self.layers)
            mask = create_attention_mask(h, cache[0])
            if self.rank > 0:  # the previous stage's output, of the embedding's shape
                h = mx.distributed.recv(h.shape, self.recv_dtype, self.rank - 1, group=self.group)
            for layer, layer_cache in zip(self.layers, cache, strict=True):
                h = layer(h, mask, cache=layer_cache)
            if self.rank < self.size - 1:
                h = mx.distributed.send(h, self.rank + 1, group=self.group)
                if cache[-1] is not None:  # keep the send in the graph of what is evaluated next
                    cache[-1].keys = mx.depends(cache[-1].keys, h)
            # Every rank gets the last stage's output (rows of the last rank in the gather).
            batch = h.shape[0]
            h = mx.distributed.all_gather(h, group=self.group)[-batch:]
            return self.norm(h)

    return PipelineStage


def check_pipeline_model(model: Any) -> None:
    """ModelLoadError unless `model` is a Llama-family model the stage can split."""
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")):
        raise ModelLoadError(
            f"pipeline sharding supports Llama-family models (embedding, layers, norm); "
            f"not {type(model).__module__}"
        )
    if any(getattr(layer, "use_sliding", False) for layer in inner.layers):
        raise ModelLoadError("pipeline sharding does not support sliding-window attention layers yet")


def _boundary_dtype(inner: Any, start: int) -> Any:
    """The dtype of the hidden state entering layer `start` (what the previous rank sends).

    It is not the embedding's: e.g. SmolLM2's fp16 embedding meets fp32 norm weights in the first
    layer, so every layer outputs fp32. MLX is lazy, so running the earlier layers on a dummy token
    only builds a graph: its dtype is known without computing (or reading) anything.
    """
    import mlx.core as mx

    h = inner.embed_tokens(mx.zeros((1, 1), dtype=mx.int32))
    for layer in inner.layers[:start]:
        h = layer(h, None, cache=None)
    return h.dtype


def load_shard(path: str, spec: ShardSpec, group: Any) -> tuple[Any, Any, int]:
    """This rank's (model, tokenizer, number of local layers). Every rank must call it together."""
    import mlx.core as mx

    if spec.sharding is Sharding.TENSOR:
        from mlx_lm.utils import sharded_load

        try:
            model, tokenizer = sharded_load(path, tensor_group=group)
        except ValueError as exc:  # e.g. "The model does not support tensor parallelism"
            raise ModelLoadError(f"cannot shard {path} by tensor: {exc}") from exc
        return model, tokenizer, len(model.layers)

    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(Path(path), lazy=True)
    check_pipeline_model(model)
    start, end = spec.layer_range(len(model.model.layers))
    model.model = _stage_class()(model.model, group, start, end, _boundary_dtype(model.model, start))
    mx.eval(model.parameters())  # reads this rank's layers only: the others are gone
    tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    # Every rank has its weights before the first step (a rank still loading would stall a step).
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    log.info("shard.loaded", sharding="pipeline", rank=spec.rank, layers=[start, end])
    return model, tokenizer, end - start
