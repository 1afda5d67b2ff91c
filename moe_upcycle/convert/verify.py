"""Check that an upcycled model computes what its dense source did."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM

from ..modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM, UpcycledMoeModel


def fixed_batch(vocab_size: int, batch_size: int = 2, seq_len: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch of token ids [B, S] and an attention mask whose second row is left-padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch_size > 1:
        attention_mask[1, : seq_len // 4] = 0
    return input_ids, attention_mask


@torch.no_grad()
def max_output_difference(dense: torch.nn.Module, moe: torch.nn.Module, vocab_size: int, field: str = "logits") -> float:
    """max |moe.<field> - dense.<field>| over the real (non-padding) tokens of :func:`fixed_batch`.

    ``field`` is ``logits`` for causal LMs, ``last_hidden_state`` for encoders.
    """
    input_ids, attention_mask = fixed_batch(vocab_size)
    a = getattr(dense(input_ids=input_ids, attention_mask=attention_mask), field).float()
    b = getattr(moe(input_ids=input_ids, attention_mask=attention_mask), field).float()
    real = attention_mask.bool()
    return (a[real] - b[real]).abs().max().item()


def verify_conversion(dense_dir: str | Path, moe_dir: str | Path, task: str = "causal_lm") -> float:
    """Load both models in float32 and return the max difference of logits (decoders) or hidden states (encoders)."""
    if task == "encoder":
        dense = AutoModel.from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True).eval()
        moe = UpcycledMoeModel.from_pretrained(moe_dir, dtype=torch.float32).eval()
        return max_output_difference(dense, moe, dense.config.vocab_size, "last_hidden_state")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True).eval()
    moe = UpcycledMoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    return max_output_difference(dense, moe, dense.config.vocab_size)
