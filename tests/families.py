"""Tiny random dense checkpoints of every supported family, for conversion tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=128, initializer_range=0.1)
_GQA = dict(num_key_value_heads=2)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {**_COMMON, **_GQA, "tie_word_embeddings": True},
    "mistral": {**_COMMON, **_GQA, "tie_word_embeddings": False},
    "qwen2": {**_COMMON, **_GQA, "tie_word_embeddings": True},
    "qwen3": {**_COMMON, **_GQA, "head_dim": 8, "tie_word_embeddings": True},
    "gemma": {**_COMMON, **_GQA, "head_dim": 8},
    "gemma2": {**_COMMON, **_GQA, "head_dim": 8, "sliding_window": 8, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_COMMON, **_GQA, "head_dim": 8, "sliding_window": 8},
    "phi3": {**_COMMON, **_GQA, "tie_word_embeddings": False, "pad_token_id": 0},
    "olmo2": {**_COMMON, **_GQA, "tie_word_embeddings": False, "pad_token_id": 0},
    "granite": {**_COMMON, **_GQA, "tie_word_embeddings": True, "residual_multiplier": 0.5,
                "embedding_multiplier": 2.0, "logits_scaling": 2.0, "attention_multiplier": 0.2},
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128, initializer_range=0.1,
                 tie_word_embeddings=True),
    "gpt_neox": {**_COMMON, "tie_word_embeddings": False, "rotary_pct": 0.5},
}
FAMILIES = sorted(FAMILY_CONFIGS)


def build_dense(model_type: str, folder: Path, seed: int = 0, shard_size: str = "30KB", **overrides) -> Path:
    """Save a tiny random ``model_type`` causal LM to ``folder`` in several safetensors shards."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**FAMILY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder
