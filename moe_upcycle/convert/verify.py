"""Check that an upcycled model computes what its dense source did."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from ..checkpoint import SafetensorsCheckpoint
from ..errors import CheckpointError
from ..modeling.modeling_upcycled_moe import _ExpertsBase
from .plan import DENSE_AUTO_CLASSES, MOE_CLASSES


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


def multimodal_token_ids(config) -> set[int]:
    """Token ids a vision-language config reserves for images, videos and their delimiters (``image_token_id``,
    ``vision_start_token_id``, ``boi_token_index``, ...): text-only inputs must not hold them."""
    dense = getattr(config, "text_config", None) if config.model_type == "upcycled_moe" else config
    if dense is None or getattr(dense, "vision_config", None) is None:
        return set()
    return {value for name, value in dense.to_dict().items()
            if name.endswith(("_token_id", "_token_index")) and isinstance(value, int)
            and not name.startswith(("pad", "bos", "eos"))}


def text_batch(config, batch_size: int = 2, seq_len: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fixed_batch` for ``config``'s vocabulary, image-free: reserved multimodal ids become other tokens."""
    vocab_size = config.get_text_config().vocab_size
    input_ids, attention_mask = fixed_batch(vocab_size, batch_size, seq_len)
    reserved = sorted(multimodal_token_ids(config))
    if reserved:
        free = next(i for i in range(vocab_size) if i not in reserved)
        input_ids = input_ids.masked_fill(torch.isin(input_ids, torch.tensor(reserved)), free)
    return input_ids, attention_mask


@torch.no_grad()
def _outputs(model: torch.nn.Module, field: str) -> torch.Tensor:
    """``field`` of ``model`` on :func:`text_batch`, float32, real (non-padding) tokens only: [N, V or H]."""
    input_ids, attention_mask = text_batch(model.config)
    out = getattr(model.eval()(input_ids=input_ids, attention_mask=attention_mask), field).float()
    return out[attention_mask.bool()]


def compare(dense: torch.Tensor, moe: torch.Tensor) -> Comparison:
    """Max difference of two output tensors; NaN or inf on either side is never a small difference."""
    dense_finite, moe_finite = bool(torch.isfinite(dense).all()), bool(torch.isfinite(moe).all())
    diff = (dense - moe).abs().max().item() if dense_finite and moe_finite else float("nan")
    return Comparison(diff, dense_finite, moe_finite)


def verify_conversion(dense_dir: str | Path, moe_dir: str | Path, task: str = "causal_lm") -> Comparison:
    """Compare the logits (decoders) or hidden states (encoders) of both models in float32.

    The dense model runs first and is freed; the upcycled model is then built with every tensor but the experts
    (:func:`load_with_lazy_experts`), so the peak is about the float32 dense model, not the float32 MoE model.
    """
    field = "last_hidden_state" if task == "encoder" else "logits"
    dense = DENSE_AUTO_CLASSES[task].from_pretrained(dense_dir, dtype=torch.float32, use_safetensors=True)
    expected = _outputs(dense, field)
    del dense
    gc.collect()
    return compare(expected, _outputs(load_with_lazy_experts(MOE_CLASSES[task], moe_dir), field))


@contextmanager
def _experts_on_meta() -> Iterator[None]:
    """Experts modules built meanwhile hold meta tensors (no memory, no initialisation)."""
    original = _ExpertsBase.__init__

    def init(self, *args, **kwargs):
        with torch.device("meta"):
            original(self, *args, **kwargs)

    _ExpertsBase.__init__ = init
    try:
        yield
    finally:
        _ExpertsBase.__init__ = original


def load_with_lazy_experts(model_class: type[PreTrainedModel], folder: str | Path) -> PreTrainedModel:
    """The upcycled model in ``folder`` in float32, for inference, with each MoE layer's experts read from the
    checkpoint just before that layer runs and dropped right after: at most one layer's experts are in memory."""
    folder = Path(folder)
    with _experts_on_meta():
        model = model_class._from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    experts = {f"{name}.": module for name, module in model.named_modules() if isinstance(module, _ExpertsBase)}
    with SafetensorsCheckpoint(folder) as tensors:
        state = {name: tensors.get(name).float() for name in tensors.keys() if not name.startswith(tuple(experts))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [name for name in missing if not name.startswith(tuple(experts)) and name not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    del state
    for prefix, module in experts.items():
        names = [name for name, _ in module.named_parameters(recurse=False)]

        def load(module, args, prefix=prefix, names=names):
            with SafetensorsCheckpoint(folder) as tensors:
                for name in names:
                    setattr(module, name, nn.Parameter(tensors.get(prefix + name).float(), requires_grad=False))

        def drop(module, args, output, names=names):
            for name in names:
                setattr(module, name, nn.Parameter(getattr(module, name).to("meta"), requires_grad=False))

        module.register_forward_pre_hook(load)
        module.register_forward_hook(drop)
    return model.eval()
