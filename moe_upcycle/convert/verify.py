"""Check that an upcycled model computes what its dense source did."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..modeling.modeling_upcycled_moe import UpcycledMoeForCausalLM


def fixed_batch(vocab_size: int, batch_size: int = 2, seq_len: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch of token ids [B, S] and an attention mask whose second row is left-padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch_size > 1:
        attention_mask[1, : seq_len // 4] = 0
    return input_ids, attention_mask


@torch.no_grad()
def max_logit_difference(dense: torch.nn.Module, moe: torch.nn.Module, vocab_size: int) -> float:
    """max |logits_moe - logits_dense| over the real (non-padding) tokens of :func:`fixed_batch`."""
    input_ids, attention_mask = fixed_batch(vocab_size)
    dense_logits = dense(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    moe_logits = moe(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    real = attention_mask.bool()
    return (dense_logits[real] - moe_logits[real]).abs().max().item()


def verify_conversion(dense_dir: str | Path, moe_dir: str | Path) -> float:
    """Load both models in float32 and return the max logit difference on a fixed batch."""
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True).eval()
    moe = UpcycledMoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    return max_logit_difference(dense, moe, dense.config.vocab_size)
