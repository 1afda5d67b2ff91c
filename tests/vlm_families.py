"""Tiny random vision-language checkpoints (weights, tokenizer, image processor, chat template), built offline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

VLM_VOCAB = 128
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = VLM_VOCAB - 1  # every kind's image token is the last id
_WORDS = ("a red green blue yellow white black circle square triangle star on the of picture shows image what is "
          "this colour shape small large background plain").split()


def chat_template(image_placeholder: str) -> str:
    """A minimal chat template writing ``image_placeholder`` for an image part (the processor expands it)."""
    return ("{% for message in messages %}{{ message['role'] }}:{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %} " + image_placeholder + "{% else %} {{ part['text'] }}{% endif %}{% endfor %}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


CHAT_TEMPLATE = chat_template(IMAGE_TOKEN)


def tiny_tokenizer(special: dict[str, str] | None = None, vocab_size: int = VLM_VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: special tokens 0-3, a few caption words, filler words, then the multimodal tokens of
    ``special`` (tokenizer attribute -> token, e.g. ``{"image_token": "<image>"}``) at the end of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    special = special or {"image_token": IMAGE_TOKEN}
    words = ["<pad>", "<s>", "</s>", "<unk>", *_WORDS, ":", "user", "assistant", "?"]
    words += [f"w{i}" for i in range(vocab_size - len(special) - len(words))]
    vocab = {word: i for i, word in enumerate([*words, *special.values()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens=special)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special.values())})
    return tokenizer


def _text_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=VLM_VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, **overrides)


def _clip_vision():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                            patch_size=8, projection_dim=32)


def _llava(text):
    """LLaVA-1.5 layout: CLIP vision tower, 2-layer MLP projector; 16 image tokens per 32x32 image."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    config = LlavaConfig(text_config=text, vision_config=_clip_vision(), image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return config, lambda tokenizer: LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


_PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def _llava_next(text):
    """LLaVA-NeXT layout: LLaVA plus any-resolution tiles (a base image and its tiles) and an image newline."""
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    config = LlavaNextConfig(text_config=text, vision_config=_clip_vision(), image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=_PINPOINTS, image_seq_length=16)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                              image_grid_pinpoints=_PINPOINTS)
    return config, lambda tokenizer: LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


_GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def _gemma3(text):
    """Gemma 3 (multimodal): SigLIP vision tower, pooled to 4 soft tokens per image between begin/end-of-image tokens."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=VLM_VOCAB - 3,
                          eoi_token_index=VLM_VOCAB - 2, image_token_index=IMAGE_TOKEN_ID)
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    return config, lambda tokenizer: Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                                     chat_template=chat_template(_GEMMA3_TOKENS["boi_token"]))


@dataclass(frozen=True)
class VlmKind:
    """How to build one tiny VLM: its config and processor, the text family, the tokenizer's multimodal tokens, and
    whether its processor takes images as one list per text row."""

    build: Callable
    text_model_type: str = "llama"
    special_tokens: dict[str, str] = field(default_factory=lambda: {"image_token": IMAGE_TOKEN})
    text_overrides: dict = field(default_factory=dict)
    images_per_row: bool = False


VLM_KINDS = {
    "llava": VlmKind(_llava),
    "llava_next": VlmKind(_llava_next),
    "gemma3": VlmKind(_gemma3, "gemma3_text", _GEMMA3_TOKENS, {"head_dim": 16, "sliding_window": 8}, images_per_row=True),
}
"""Vision-language model types -> how to build a tiny one."""


def build_vlm(kind: str, folder: Path, seed: int = 0, processor: bool = True, text_model_type: str | None = None,
              **text_overrides) -> Path:
    """Save a tiny random VLM of ``kind`` (a 2-layer language model of hidden 64, the kind's own family unless
    ``text_model_type``, and a 2-layer vision tower for 32x32 images) with its tokenizer, image processor and chat
    template (``processor=False``: weights, config and tokenizer only) in several shards."""
    spec = VLM_KINDS[kind]
    text = _text_config(text_model_type or spec.text_model_type, **{**spec.text_overrides, **text_overrides})
    config, make_processor = spec.build(text)
    torch.manual_seed(seed)
    AutoModelForImageTextToText.from_config(config).save_pretrained(folder, max_shard_size="100KB")
    tokenizer = tiny_tokenizer(spec.special_tokens)
    if processor:
        make_processor(tokenizer).save_pretrained(folder)
    else:
        tokenizer.save_pretrained(folder)
    return folder


def build_llava(folder: Path, **kwargs) -> Path:
    """A tiny LLaVA (see :func:`build_vlm`)."""
    return build_vlm("llava", folder, **kwargs)


def shape_image(colour: str = "red", size: int = 32) -> Image.Image:
    """A coloured square on a white background."""
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image
