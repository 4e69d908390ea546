"""A tiny random-weight llama built offline, for tests of the MLX engine.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a small built-in corpus and an
`mlx_lm.models.llama.Model` with a tiny ModelArgs is initialised from a fixed seed, so every build
is identical. The directory has what `mlx_lm.load` expects: config.json, model.safetensors,
tokenizer.json and tokenizer_config.json (with a chat template, which `apply_chat_template` needs).

The embedding row of the EOS token is zeroed. The embeddings are tied, so the EOS logit is exactly 0
while the other logits are spread around 0: greedy decoding never ends early, and tests can rely on
it reaching `max_tokens`. Sampled decoding may still pick EOS now and then.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A scheduler places each request on the least loaded
instance of its model. Workers send heartbeats every second, and the master notices a worker that
misses three of them. What is the capital of France? The capital of France is Paris. Tokens stream
back to the client one piece at a time, and a cancelled request stops within one token. Hello,
world! Numbers like 1, 2, 3, 42 and 2024 appear in text too. Small models are fast; large models are
slow but they know more. The cluster has two nodes, each with one model instance and a queue.
"""

VOCAB_SIZE = 384  # 256 byte symbols + 3 special tokens + merges learnt from the corpus
SEED = 1234


def _train_tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus gives the merges clear counts, so ties (and any order they depend on) are rare.
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer


def build_tiny_model(directory: Path, *, whole_characters: bool = False, **shape: int) -> Path:
    """Write a tiny llama into `directory` (created if missing) and return it.

    `shape` overrides config fields (e.g. num_attention_heads=6, num_key_value_heads=3,
    hidden_size=96, intermediate_size=192 for a model that tensor-shards 3 ways).
    `whole_characters`: the tokens that decode to part of a UTF-8 character get zeroed embeddings
    too (so greedy never picks them), and the text streams as it is generated."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab_size: int = tokenizer.get_vocab_size()
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    bos_id = tokenizer.token_to_id("<|im_start|>")
    assert eos_id is not None and bos_id is not None

    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,  # must equal the tokenizer's size, or embedding lookups go out of range
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        **shape,
    }
    mx.random.seed(SEED)
    model = Model(ModelArgs.from_dict(config))
    embedding = model.model.embed_tokens.weight
    never = [eos_id]
    if whole_characters:
        never += [i for i in range(vocab_size) if "\ufffd" in tokenizer.decode([i])]
    keep = mx.ones((vocab_size,))
    keep[mx.array(never)] = 0
    model.model.embed_tokens.weight = embedding * keep[:, None]
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "mlx"})

    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": EOS_TOKEN,
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory


@contextmanager
def model_directory(model: str) -> Iterator[Path]:
    """A local model directory for the benchmark scripts: "tiny" built into a temporary directory
    (removed afterwards), any other name resolved by exo_worker.models (smollm2 prepared from its
    package if needed; ModelLoadError when it cannot be)."""
    if model == "tiny":
        with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
            yield build_tiny_model(Path(tmp) / "tiny-model")
        return
    from exo_worker.models import resolve_model

    yield Path(resolve_model(model))
