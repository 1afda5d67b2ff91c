"""Tiny random dense checkpoints of every supported family, for conversion tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=128, initializer_range=0.1)
_GQA = dict(num_key_value_heads=2)
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=128, initializer_range=0.1, bias=True, tie_word_embeddings=True)

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
    # Phi-2 style: MHA, partial rotary (0.5), biased fc1/fc2, untied lm_head with bias.
    "phi": {**_COMMON, "tie_word_embeddings": False},
    # StableLM 2 style: qkv biases, partial rotary (0.25); sequential residual (the default).
    "stablelm": {**_COMMON, **_GQA, "tie_word_embeddings": False, "use_qkv_bias": True},
    # StableLM-3B style: parallel residual and per-head q/k layer norms; MHA (StableLM's num_key_value_heads
    # defaults to 32 whatever num_attention_heads is, so it is set explicitly).
    "stablelm_parallel": {**_COMMON, "num_key_value_heads": 4, "tie_word_embeddings": False, "use_parallel_residual": True,
                          "qk_layernorm": True},
    # StarCoder2 style: GQA, biased c_fc/c_proj, sliding-window attention; bos/eos moved inside the tiny vocab.
    "starcoder2": {**_COMMON, **_GQA, "use_bias": True, "sliding_window": 8, "bos_token_id": 0, "eos_token_id": 0,
                   "tie_word_embeddings": True},
    # Falcon: the default layout (Falcon-7B: parallel attention, multi-query, rotary, old decoder architecture,
    # no biases); ffn_hidden_size is Falcon's intermediate size.
    "falcon": {**_FALCON, "bias": False, "new_decoder_architecture": False, "parallel_attn": True, "multi_query": True,
               "alibi": False},
    # Falcon-40B/180B layout: new decoder architecture (grouped KV heads, two layer norms), rotary.
    "falcon_new_arch": {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2, "alibi": False},
    # Falcon-RW layout: sequential attention/MLP, full multi-head attention, ALiBi positions, biases.
    "falcon_rw": {**_FALCON, "new_decoder_architecture": False, "parallel_attn": False, "multi_query": False,
                  "alibi": True},
    # OPT (Zhang et al. 2022): fc1/fc2 directly on the decoder layer, pre-norm (OPT-125m ... 66B except 350m).
    "opt": dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32, init_std=0.1, pad_token_id=1,
                tie_word_embeddings=True),
}
FAMILIES = sorted(FAMILY_CONFIGS)
VARIANT_OF = {"stablelm_parallel": "stablelm", "falcon_new_arch": "falcon", "falcon_rw": "falcon"}
"""Extra cases of a family (another layout of the same ``model_type``), keyed like ``FAMILY_CONFIGS``."""


def build_dense(model_type: str, folder: Path, seed: int = 0, shard_size: str = "30KB", **overrides) -> Path:
    """Save a tiny random causal LM of the ``FAMILY_CONFIGS`` case ``model_type`` to ``folder`` in several shards.

    ``model_type`` is a Transformers model type, or a variant of one listed in ``VARIANT_OF``.
    """
    torch.manual_seed(seed)
    config = AutoConfig.for_model(VARIANT_OF.get(model_type, model_type), **{**FAMILY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, max_shard_size=shard_size)
    return folder


def build_branch(base: Path, folder: Path, seed: int, scale: float = 0.05) -> Path:
    """Save ``base`` with every weight (MLPs, attention, norms, embeddings) plus Gaussian noise of std ``scale`` to
    ``folder``, with ``base``'s tokenizer files: a branch of ``base`` trained on its own data, for ``mix`` tests."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    model.save_pretrained(folder, max_shard_size="30KB")
    for side_file in Path(base).glob("*token*"):
        shutil.copy(side_file, folder / side_file.name)
    return folder
