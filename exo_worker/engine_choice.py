"""Which engine a worker runs, and the model name clients use for it: resolved once at start."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from pathlib import Path

from exo_worker.engine import Engine, ModelLoadError
from exo_worker.local_models import SimModel
from protocol.ids import InstanceId, ModelId
from protocol.messages import LocalModel

EngineFactory = Callable[[InstanceId], Engine]
ModelEngineFactory = Callable[[ModelId, InstanceId, int], Engine]


class EngineName(enum.StrEnum):
    SIM = "sim"
    MLX = "mlx"


DEFAULT_MODEL = {EngineName.SIM: "sim-model", EngineName.MLX: "smollm2"}


def served_model_id(model: str) -> ModelId:
    """The name clients use for the model: a local directory is served under its folder name."""
    path = Path(model).expanduser()
    return ModelId(path.resolve().name if path.is_dir() else model)


def build_engine_factory(
    engine: EngineName,
    model: str,
    sim_tokens_per_s: float,
    *,
    max_concurrency: int = 4,
    prompt_cache_bytes: int | None = None,
    prefill_chunk: int = 0,
    sim_prefill_tokens_per_s: float = math.inf,
    sim_context_length: int = 0,
) -> EngineFactory:
    """Resolve the backend once; raises ModelLoadError when the model cannot be found.

    An MLX instance batches up to `max_concurrency` sequences and keeps a prompt cache of at most
    `prompt_cache_bytes` (None: derived from the memory available; 0: no prompt cache), and
    processes prompts `prefill_chunk` tokens per step (0: sized from its measured prefill rate).
    A sim instance models prefill at `sim_prefill_tokens_per_s` (inf: instant) in chunks of
    `prefill_chunk` (0: 256) and a context of `sim_context_length` tokens (0: unlimited).
    """
    if engine is EngineName.SIM:
        from exo_worker.sim_engine import SimEngine

        return lambda instance_id: SimEngine(
            sim_tokens_per_s,
            seed_salt="",
            prefill_tokens_per_s=sim_prefill_tokens_per_s,
            prefill_chunk=prefill_chunk or 256,
            context_length=sim_context_length,
        )
    try:
        # Imported lazily: mlx is heavy and optional; the sim engine must work without it.
        from exo_worker.mlx_engine import MlxEngine
        from exo_worker.models import resolve_model
    except ImportError as exc:
        raise ModelLoadError(f"the mlx engine is not available: {exc} (install exo-master[mlx])") from exc
    path = resolve_model(model)
    return lambda instance_id: MlxEngine(
        path,
        label=model,
        max_batch=max_concurrency,
        prompt_cache_bytes=prompt_cache_bytes,
        prefill_chunk=prefill_chunk,
    )


def build_model_engines(
    engine: EngineName,
    catalog: dict[ModelId, LocalModel],
    sim_models: dict[ModelId, SimModel],
    sim_tokens_per_s: float,
    *,
    prompt_cache_bytes: int | None = None,
    prefill_chunk: int = 0,
    sim_prefill_tokens_per_s: float = math.inf,
    sim_context_length: int = 0,
) -> ModelEngineFactory:
    """Engines for the models the master places here (LoadInstance): any model in the catalog, with
    the same prefill settings as an instance the worker declares itself (see build_engine_factory)."""
    if engine is EngineName.SIM:
        from exo_worker.sim_engine import SimEngine

        def sim(model: ModelId, instance_id: InstanceId, slots: int) -> Engine:
            return SimEngine(
                sim_tokens_per_s,
                seed_salt="",
                load_delay_s=sim_models[model].load_seconds,
                prefill_tokens_per_s=sim_prefill_tokens_per_s,
                prefill_chunk=prefill_chunk or 256,
                context_length=sim_context_length,
            )

        return sim

    def mlx(model: ModelId, instance_id: InstanceId, slots: int) -> Engine:
        try:
            from exo_worker.mlx_engine import MlxEngine
        except ImportError as exc:
            raise ModelLoadError(f"the mlx engine is not available: {exc} (install exo-master[mlx])") from exc
        # The daemon prepared the built-in model at start, so every catalog entry is a directory.
        path = catalog[model].path
        return MlxEngine(
            path,
            label=str(model),
            max_batch=slots,
            prompt_cache_bytes=prompt_cache_bytes,
            prefill_chunk=prefill_chunk,
        )

    return mlx
