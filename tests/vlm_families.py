"""Tiny random vision-language checkpoints (weights, tokenizer, image processor, chat template), built offline."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast, ProcessorMixin
from transformers.utils import is_torchvision_available

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


def token_ids(special: dict[str, str]) -> dict[str, int]:
    """Token attribute -> id of the multimodal tokens :func:`tiny_tokenizer` puts at the end of the vocabulary."""
    return {name: VLM_VOCAB - len(special) + i for i, name in enumerate(special)}


def without_video(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` without its video processor, for images only: Transformers builds video processors only
    with torchvision, which the test machines lack. Saved, it names the stock class."""

    class ImagesOnly(processor_class):
        # SmolVLM's chat template reads the video processor's default frame count and rate: unset without one
        video_processor = SimpleNamespace(num_frames=None, fps=None)

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

        @classmethod
        def _get_arguments_from_pretrained(cls, *args, **kwargs) -> list:
            arguments = super()._get_arguments_from_pretrained(*args, **kwargs)
            arguments.insert(processor_class.get_attributes().index("video_processor"), None)  # no video processor
            return arguments

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__  # the name save_pretrained writes
    return ImagesOnly


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
    ids = token_ids(_GEMMA3_TOKENS)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=ids["boi_token"],
                          eoi_token_index=ids["eoi_token"], image_token_index=ids["image_token"])
    image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    return config, lambda tokenizer: Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                                     chat_template=chat_template(_GEMMA3_TOKENS["boi_token"]))


_QWEN_TOKENS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                "video_token": "<|video_pad|>", "image_token": "<|image_pad|>"}
_QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
# Multimodal rope: the 8 rotary frequencies of a 16-wide head split over (time, height, width) positions.
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}


def _qwen_vl(config_class, processor_class, vision: dict, text):
    """A Qwen-VL: ``vision`` (2 layers, patch 8, 2x2 merge, out width 64) turns a 32x32 image into 16 patches and 4
    image tokens between vision start/end tokens; positions are multimodal rope (mrope)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = token_ids(_QWEN_TOKENS)
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["image_token"],
                          video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
                          vision_end_token_id=ids["vision_end_token"])
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32}, patch_size=8,
                                               merge_size=2, temporal_patch_size=2)
    return config, lambda tokenizer: without_video(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(_QWEN_PLACEHOLDER))


_QWEN_VISION = dict(depth=2, num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)


def _qwen2_vl(text):
    """Qwen2-VL: a ViT with 2-D rotary positions and a patch merger."""
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    return _qwen_vl(Qwen2VLConfig, Qwen2VLProcessor, dict(_QWEN_VISION, embed_dim=32, hidden_size=64), text)


def _qwen2_5_vl(text):
    """Qwen2.5-VL: Qwen2-VL with window attention in the vision tower (full attention in its last layer)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    vision = dict(_QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                  fullatt_block_indexes=[1])
    return _qwen_vl(Qwen2_5_VLConfig, Qwen2_5_VLProcessor, vision, text)


def _qwen3_vl(text):
    """Qwen3-VL: learned vision positions, interleaved mrope, and deepstack: the features of vision layers 0 and 1 are
    added to the hidden states after language layers 0 and 1."""
    from transformers import Qwen3VLConfig, Qwen3VLProcessor

    vision = dict(_QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    return _qwen_vl(Qwen3VLConfig, Qwen3VLProcessor, vision, text)


_IDEFICS_TOKENS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                   "end_of_utterance_token": "<end_of_utterance>", "image_token": IMAGE_TOKEN}
# A 2-layer ViT of width 32 for 32x32 images in 8x8 patches (Idefics3's and Pixtral's vision configs take these names).
_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def _idefics(config_class, image_processor_class, make_processor: Callable, text):
    """An Idefics3-layout VLM: a SigLIP-like tower, pixel shuffle (scale 2) and a linear connector: 4 image tokens per
    32x32 image, between fake image tokens after a global-image tag (no image splitting)."""
    config = config_class(text_config=text, vision_config=_VIT, scale_factor=2, image_token_id=IMAGE_TOKEN_ID)
    image_processor = image_processor_class(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                            do_image_splitting=False)
    return config, lambda tokenizer: make_processor(image_processor=image_processor, tokenizer=tokenizer,
                                                    image_seq_len=4, chat_template=CHAT_TEMPLATE)


def _idefics3(text):
    """Idefics3."""
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return _idefics(Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor, text)


def _smolvlm(text):
    """SmolVLM: Idefics3's layout (its processor also has a video processor)."""
    from transformers import SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    make_processor = partial(without_video(SmolVLMProcessor), video_processor=None)
    return _idefics(SmolVLMConfig, SmolVLMImageProcessorPil, make_processor, text)


_PIXTRAL_TOKENS = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]"}


class PixtralProcessor(ProcessorMixin):
    """Transformers' ``PixtralProcessor`` (Mistral 3's), which Transformers 5.24 imports only with torchvision: the same
    arguments, saved files and image tokens ([IMG] per merged patch, [IMG_BREAK] after each row, [IMG_END] last)."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template=None, image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                 **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size, self.spatial_merge_size = patch_size, spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def _process_images(self, images, **kwargs):
        kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        step = self.patch_size * self.spatial_merge_size
        height, width = image_inputs["image_sizes"][image_idx]
        row = self.image_token * int(width // step)
        return self.image_break_token.join([row] * int(height // step)) + self.image_end_token


STAND_INS: dict[str, type[ProcessorMixin]] = {"PixtralProcessor": PixtralProcessor}
"""Processor classes Transformers imports only with torchvision -> the stand-in the tests use without it."""


def _mistral3(text):
    """Mistral 3 (Mistral Small 3.1): a Pixtral vision tower (2-D rotary positions), a 2x2 patch merger and a projector:
    4 image tokens per 32x32 image, a break token after each row and an end token."""
    from transformers import Mistral3Config
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    vision = dict(model_type="pixtral", **_VIT)
    config = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2, image_token_index=IMAGE_TOKEN_ID,
                            vision_feature_layer=-1, tie_word_embeddings=False)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 32}, patch_size=8)
    processor_class = transformers.PixtralProcessor if is_torchvision_available() else PixtralProcessor
    return config, lambda tokenizer: processor_class(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, spatial_merge_size=2,
        chat_template=chat_template(_PIXTRAL_TOKENS["image_token"]), **_PIXTRAL_TOKENS)


@dataclass(frozen=True)
class VlmKind:
    """How to build one tiny VLM: its config and processor, the text family, the tokenizer's multimodal tokens,
    whether its processor takes images as one list per text row, and what ``export`` says of its MoE-LLaVA upcycling
    (MoE every other layer): a phrase of the refusal, or None where it writes the native twin."""

    build: Callable
    text_model_type: str = "llama"
    special_tokens: dict[str, str] = field(default_factory=lambda: {"image_token": IMAGE_TOKEN})
    text_overrides: dict = field(default_factory=dict)
    images_per_row: bool = False
    sparse_export_refusal: str | None = "every Mixtral layer is a MoE layer"


VLM_KINDS = {
    "llava": VlmKind(_llava),
    "llava_next": VlmKind(_llava_next),
    "gemma3": VlmKind(_gemma3, "gemma3_text", _GEMMA3_TOKENS, {"head_dim": 16, "sliding_window": 8}, images_per_row=True,
                      sparse_export_refusal="Gemma 3 has no native MoE twin"),
    "qwen2_vl": VlmKind(_qwen2_vl, "qwen2_vl_text", _QWEN_TOKENS, {"rope_parameters": _MROPE},
                        sparse_export_refusal="Qwen2-VL has no native MoE twin"),
    "qwen2_5_vl": VlmKind(_qwen2_5_vl, "qwen2_5_vl_text", _QWEN_TOKENS, {"rope_parameters": _MROPE},
                          sparse_export_refusal="Qwen2.5-VL has no native MoE twin"),
    "qwen3_vl": VlmKind(_qwen3_vl, "qwen3_vl_text", _QWEN_TOKENS,
                        {"head_dim": 16, "rope_parameters": {**_MROPE, "mrope_interleaved": True}}, sparse_export_refusal=None),
    "idefics3": VlmKind(_idefics3, special_tokens=_IDEFICS_TOKENS, images_per_row=True),
    "smolvlm": VlmKind(_smolvlm, special_tokens=_IDEFICS_TOKENS, images_per_row=True),
    "mistral3": VlmKind(_mistral3, "mistral", _PIXTRAL_TOKENS),
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


def load_processor(folder: Path) -> ProcessorMixin:
    """The processor saved in ``folder``, as ``AutoProcessor`` loads it; one saved without its video processor (as the
    tiny checkpoints here are: see :func:`without_video`) is loaded without it, and one that Transformers imports only
    with torchvision is loaded as its stand-in where torchvision is missing."""
    saved = json.loads((Path(folder) / "processor_config.json").read_text())
    name = saved["processor_class"]
    if name in STAND_INS and not is_torchvision_available():
        return STAND_INS[name].from_pretrained(folder)
    processor_class = getattr(transformers, name)
    video = "video_processor" in saved or (Path(folder) / "video_preprocessor_config.json").is_file()
    if "video_processor" in processor_class.get_attributes() and not video:
        return without_video(processor_class).from_pretrained(folder)
    return AutoProcessor.from_pretrained(folder)


def shape_image(colour: str = "red", size: int = 32) -> Image.Image:
    """A coloured square on a white background."""
    image = Image.new("RGB", (size, size), "white")
    image.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image
