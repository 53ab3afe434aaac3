"""Tiny random-weight Hugging Face checkpoints of every import-hf family, built by ``transformers`` from a config
(no download): the independent references of the import tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 256
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
             bos_token_id=1, eos_token_id=2)

# family id -> (transformers config class name, config overrides)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3-rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaConfig", dict(tie_word_embeddings=False, rope_scaling={"type": "linear",
                                                                                        "factor": 2.0})),
    "smollm": ("LlamaConfig", dict(tie_word_embeddings=True, num_attention_heads=6, num_key_value_heads=2,
                                   hidden_size=96, rope_theta=100000.0)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, use_sliding_window=False)),
}


def tiny_tokenizer():
    """A fast word-level tokenizer of VOCAB tokens: <unk>, <s>, </s>, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = ["hello", "world"] + [f"w{i}" for i in range(VOCAB - len(specials) - 2)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny(family: str, folder: Path, *, seed: int = 0, max_shard_size: str = "5GB", **overrides: Any):
    """Save a random-weight model of `family` (+ tokenizer) as a HF folder; return (model in eval mode, tokenizer).

    Weights are N(0, 0.1^2) (norm weights 1 + N(0, 0.1^2)), large enough that a wrong layout changes the logits.
    A small ``max_shard_size`` writes several safetensors shards and their index.
    """
    import transformers

    class_name, extra = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.eval()
    tokenizer = tiny_tokenizer()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
