"""Check that an upcycled model computes what its dense source did."""

from __future__ import annotations

import gc
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Comparison:
    """How far the upcycled model's outputs are from the dense model's on :func:`fixed_batch`."""

    max_diff: float  # max |moe - dense| over real tokens; nan when either side is not finite
    dense_finite: bool
    moe_finite: bool


@torch.no_grad()
def _outputs(model: torch.nn.Module, field: str) -> torch.Tensor:
    """``field`` of ``model`` on :func:`fixed_batch`, float32, real (non-padding) tokens only: [N, V or H]."""
    input_ids, attention_mask = fixed_batch(model.config.get_text_config().vocab_size)
    out = getattr(model.eval()(input_ids=input_ids, attention_mask=attention_mask), field).float()
    return out[attention_mask.bool()]


def compare(dense: torch.Tensor, moe: torch.Tensor) -> Comparison:
    """Max difference of two output tensors; NaN or inf on either side is never a small difference."""
    dense_finite, moe_finite = bool(torch.isfinite(dense).all()), bool(torch.isfinite(moe).all())
    diff = (dense - moe).abs().max().item() if dense_finite and moe_finite else float("nan")
    return Comparison(diff, dense_finite, moe_finite)


def verify_conversion(dense_dir: str | Path, moe_dir: str | Path, task: str = "causal_lm") -> Comparison:
    """Compare the logits (decoders) or hidden states (encoders) of both models in float32.

    The models are loaded one after the other, so the peak is the larger of the two, not their sum.
    """
    field = "last_hidden_state" if task == "encoder" else "logits"
    dense_class, moe_class = (AutoModel, UpcycledMoeModel) if task == "encoder" else (AutoModelForCausalLM, UpcycledMoeForCausalLM)
    dense = dense_class.from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True)
    expected = _outputs(dense, field)
    del dense
    gc.collect()
    moe = moe_class.from_pretrained(moe_dir, dtype=torch.float32)
    return compare(expected, _outputs(moe, field))
