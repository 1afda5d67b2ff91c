"""Vision-language models (issue 15): the language model of LLaVA, LLaVA-NeXT, Gemma 3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Idefics3, SmolVLM and Mistral 3 upcycled into MoE blocks every other layer (MoE-LLaVA's layout), exact against the dense
VLM with images, loadable with and without the package; exports to stock classes (LLaVA-style VLMs with a Mixtral,
Qwen2-MoE or Qwen3-MoE language model, Qwen3-VL to Qwen3-VL-MoE) compute what ours do, the others are refused; unsupported
layouts are refused before anything is written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText

import moe_upcycle
from moe_upcycle.adapters import get_adapter
from moe_upcycle.checkpoint import SafetensorsCheckpoint
from moe_upcycle.cli import main
from moe_upcycle.convert.plan import dense_layout, match_source_keys
from moe_upcycle.errors import UnsupportedArchitectureError
from moe_upcycle.export import export_native

from .vlm_families import IMAGE_TOKEN_ID, VLM_KINDS, build_llava, build_vlm, load_processor, shape_image

TOL = 1e-5
NEW_TOKENS = 8


def _inputs(folder, kind: str = "llava"):
    """A batch with an image (row 0) and a left-padded text-only row (row 1), from the checkpoint's own processor."""
    processor = load_processor(folder)
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this shape ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [[shape_image("red")], []] if VLM_KINDS[kind].images_per_row else [shape_image("red")]
    return processor(images=images, text=[prompt, "a blue circle"], padding=True, return_tensors="pt")


def _load(folder, **kwargs):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


ROW_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # one entry per text row


def image_row(inputs):
    """Row 0 (the one with the image) of :func:`_inputs`, with every image input."""
    return {key: value[:1] if key in ROW_KEYS else value for key, value in inputs.items()}


@torch.no_grad()
def _run(model, inputs):
    """(logits of real tokens [N, V], greedy continuation of the image row [NEW_TOKENS])."""
    logits = model(**inputs).logits[inputs["attention_mask"].bool()]
    out = model.generate(**image_row(inputs), max_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, out[0, -NEW_TOKENS:]


@pytest.fixture(scope="module", params=sorted(VLM_KINDS))
def upcycled(request, tmp_path_factory):
    """A tiny dense VLM and its MoE-LLaVA upcycling: 4 experts, top-2, every other layer."""
    folder = tmp_path_factory.mktemp(request.param)
    dense = build_vlm(request.param, folder / "dense")
    result = moe_upcycle.upcycle(dense, folder / "moe", num_experts=4, top_k=2, layers="every:2", verify=True)
    return dense, folder / "moe", result, request.param


def test_upcycled_vlm_is_exact_with_images(upcycled):
    dense_dir, moe_dir, result, kind = upcycled
    assert result.moe_layers == [1] and "the MoE model computes what the dense model did" in result.notes[-1]
    inputs = _inputs(moe_dir, kind)  # the processor loads from the output
    assert inputs["attention_mask"][1, 0] == 0 and (inputs["input_ids"][0] == IMAGE_TOKEN_ID).sum() >= 4
    dense_logits, dense_tokens = _run(_load(dense_dir), inputs)
    moe = _load(moe_dir)
    assert type(moe).__name__ == "UpcycledMoeForImageTextToText" and len(moe.moe_blocks()) == 1
    moe_logits, moe_tokens = _run(moe, inputs)
    assert (moe_logits - dense_logits).abs().max() < TOL
    assert torch.equal(moe_tokens, dense_tokens)
    config = json.loads((moe_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_upcycled_moe.UpcycledMoeForImageTextToText"


def test_everything_but_the_language_mlps_is_copied_byte_for_byte(upcycled):
    dense_dir, moe_dir, _, _ = upcycled
    config = AutoConfig.from_pretrained(dense_dir)
    adapter = get_adapter(config)
    language = adapter.decoder_layers_path.removesuffix(".layers")  # the language model, e.g. model.language_model
    with torch.device("meta"):
        parts = {f"model.{name}" for name, _ in AutoModelForImageTextToText.from_config(config).model.named_children()}
    vision = parts - {language}  # the vision tower and the projector
    with SafetensorsCheckpoint(dense_dir) as source, SafetensorsCheckpoint(moe_dir) as ours:
        keys = match_source_keys(source.keys(), dense_layout(config, "image_text_to_text"))  # in-memory name -> key
        copied = [name for name in keys if not name.startswith(adapter.mlp_prefix(1))]
        for name in copied:
            theirs, mine = source.get(keys[name]), ours.get("model." + name)
            assert mine.dtype == theirs.dtype and mine.view(torch.uint8).equal(theirs.view(torch.uint8)), name
        assert vision and all(any(name.startswith(part + ".") for name in copied) for part in vision), vision
        tied = config.tie_word_embeddings  # Gemma 3 reads its LM head from the embeddings
        assert f"{language}.embed_tokens.weight" in copied and ("lm_head.weight" in copied) != tied
        assert sorted(name for name in ours.keys() if name.endswith("experts.gate_up_proj")) == \
            [f"model.{adapter.mlp_prefix(1)}experts.gate_up_proj"]  # the vision tower's MLPs stay dense
        assert len(ours.keys()) == len(copied) + 3  # router, gate_up_proj, down_proj


CHILD = r"""
import json, sys
sys.modules["moe_upcycle"] = None  # importing it now raises ImportError
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
inputs = load_file(sys.argv[2])
model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    logits = model(**inputs).logits.contiguous()
    row = {key: value[:1] if key in sys.argv[5].split(",") else value for key, value in inputs.items()}
    tokens = model.generate(**row, max_new_tokens=int(sys.argv[4]), do_sample=False)
save_file({"logits": logits, "tokens": tokens.contiguous()}, sys.argv[3])
"""


def test_upcycled_vlm_loads_with_remote_code_without_the_package(upcycled, tmp_path):
    _, moe_dir, _, kind = upcycled
    inputs = _inputs(moe_dir, kind)
    model = _load(moe_dir)
    with torch.no_grad():
        expected = model(**inputs).logits
    _, expected_tokens = _run(model, inputs)
    save_file({key: value.contiguous() for key, value in inputs.items()}, tmp_path / "inputs.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", CHILD, str(moe_dir), str(tmp_path / "inputs.safetensors"),
                    str(tmp_path / "out.safetensors"), str(NEW_TOKENS), ",".join(ROW_KEYS)], check=True, env=env, cwd=tmp_path)
    got = load_file(tmp_path / "out.safetensors")
    assert torch.equal(got["logits"], expected)
    assert torch.equal(got["tokens"][0, -NEW_TOKENS:], expected_tokens)


def test_llava_exports_to_stock_llava_with_mixtral(tmp_path):
    # rms_norm_eps and rope_theta differ from Mixtral's defaults (1e-5, 1e6): left at defaults the logits would differ
    dense = build_llava(tmp_path / "dense", rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="all", expert_noise=0.2)
    result = export_native(tmp_path / "moe", tmp_path / "native")
    assert (result.target, result.architecture, result.source_family) == ("mixtral", "LlavaForConditionalGeneration", "llama")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "llava" and "auto_map" not in config
    text = config["text_config"]
    assert text["model_type"] == "mixtral" and text["num_local_experts"] == 4 and text["rms_norm_eps"] == 1e-6
    assert text["rope_parameters"]["rope_theta"] == 5000.0
    assert not list((tmp_path / "native").glob("*.py"))
    inputs = _inputs(tmp_path / "native")  # the processor came along
    native = _load(tmp_path / "native")
    assert type(native).__module__.startswith("transformers.models.llava")
    assert type(native.model.language_model).__name__ == "MixtralModel"
    native_logits, native_tokens = _run(native, inputs)
    ours_logits, ours_tokens = _run(_load(tmp_path / "moe"), inputs)
    assert (native_logits - ours_logits).abs().max() < TOL
    assert torch.equal(native_tokens, ours_tokens)


NATIVE_EXPORTS = {  # (VLM kind, its language model) -> (export target, the native language model's class, MoE layers)
    ("llava", "qwen2"): ("qwen2_moe", "Qwen2MoeModel", "every:2"),
    ("llava", "qwen3"): ("qwen3_moe", "Qwen3MoeModel", "every:2"),
    ("llava_next", "llama"): ("mixtral", "MixtralModel", "all"),
    ("idefics3", "llama"): ("mixtral", "MixtralModel", "all"),
    ("smolvlm", "llama"): ("mixtral", "MixtralModel", "all"),
    ("mistral3", "mistral"): ("mixtral", "MixtralModel", "all"),
    ("mistral3", "llama"): ("mixtral", "MixtralModel", "all"),
    ("qwen3_vl", "qwen3_vl_text"): ("qwen3_vl_moe", "Qwen3VLMoeTextModel", "every:2"),
}


@pytest.mark.parametrize("kind, text_model_type", sorted(NATIVE_EXPORTS))
def test_vlm_exports_to_its_native_twin(kind, text_model_type, tmp_path):
    """Every dense text-config field is carried over, and stock Transformers computes what ours does."""
    target, language_model, layers = NATIVE_EXPORTS[kind, text_model_type]
    dense = build_vlm(kind, tmp_path / "dense", text_model_type=text_model_type)
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers=layers, expert_noise=0.2)
    result = export_native(tmp_path / "moe", tmp_path / "native")
    assert (result.target, result.source_family) == (target, text_model_type)
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert "auto_map" not in config and not list((tmp_path / "native").glob("*.py"))
    dense_text, text = json.loads((dense / "config.json").read_text())["text_config"], config["text_config"]
    no_window = {None, 0}  # Qwen2-MoE writes Qwen2's "no sliding window" (None) as 0
    changed = {name for name, value in dense_text.items() if name in text and text[name] != value
               and not (name == "sliding_window" and {value, text[name]} <= no_window)}
    assert changed == {"model_type"}, {name: (dense_text[name], text[name]) for name in changed}
    inputs = _inputs(tmp_path / "native", kind)  # the processor came along
    native = _load(tmp_path / "native")
    assert type(native).__module__.startswith("transformers.models.")
    language = get_adapter(AutoConfig.from_pretrained(dense)).decoder_layers_path.removesuffix(".layers")
    assert type(native.get_submodule(language)).__name__ == language_model
    native_logits, native_tokens = _run(native, inputs)
    ours_logits, ours_tokens = _run(_load(tmp_path / "moe"), inputs)
    assert (native_logits - ours_logits).abs().max() < TOL
    assert torch.equal(native_tokens, ours_tokens)


def test_export_without_an_exact_twin_is_refused(upcycled, tmp_path):
    why = VLM_KINDS[upcycled[3]].sparse_export_refusal
    if why is None:
        pytest.skip(f"{upcycled[3]} with MoE every other layer has a native twin (test_vlm_exports_to_its_native_twin)")
    with pytest.raises(moe_upcycle.errors.UpcycleError, match=re.escape(why)):
        export_native(upcycled[1], tmp_path / "native")
    assert not (tmp_path / "native").exists()


def test_unsupported_vision_language_layout_is_refused(tmp_path, capsys):
    source = tmp_path / "paligemma"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    every_kind = ", ".join(sorted(VLM_KINDS))  # each supported family has its tiny model here
    with pytest.raises(UnsupportedArchitectureError, match=f"supported vision-language families: {every_kind}$"):
        moe_upcycle.upcycle(source, tmp_path / "out")
    assert main(["convert", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vision-language model_type 'paligemma' is not supported" in err
    assert not (tmp_path / "out").exists()


def test_llava_with_unsupported_language_model_is_refused(tmp_path):
    source = build_llava(tmp_path / "dense", text_model_type="phi")
    with pytest.raises(UnsupportedArchitectureError, match="language model is 'phi'.*supported: llama, mistral, qwen2"):
        moe_upcycle.upcycle(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_without_processor_converts_with_a_note(tmp_path):
    source = build_llava(tmp_path / "dense", processor=False)
    result = moe_upcycle.upcycle(source, tmp_path / "out", num_experts=4, top_k=2, layers="every:2")
    assert any("cannot be used with images until" in note for note in result.notes)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("kind, text_model_type", [("llava", "mistral"), ("llava", "qwen2"), ("llava", "qwen3"),
                                                    ("mistral3", "llama")])
def test_vlms_with_other_language_models_are_exact(kind, text_model_type, tmp_path):
    dense = build_vlm(kind, tmp_path / "dense", text_model_type=text_model_type)
    result = moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="every:2", verify=True)
    assert "the MoE model computes what the dense model did" in result.notes[-1]
    inputs = _inputs(tmp_path / "moe", kind)
    dense_logits, dense_tokens = _run(_load(dense), inputs)
    moe_logits, moe_tokens = _run(_load(tmp_path / "moe"), inputs)
    assert (moe_logits - dense_logits).abs().max() < TOL and torch.equal(moe_tokens, dense_tokens)


EXACT_RECIPES = {  # the text recipes that keep a model exact, on a VLM's language model (issue 15 point 1)
    "granular": dict(num_experts=8, top_k=4, granularity=2),
    "softmax_topk": dict(router_type="softmax_topk"),
    "sigmoid": dict(router_type="sigmoid"),
    "shared_experts": dict(num_experts=6, top_k=3, granularity=4, shared_experts=1, shared_expert_gate=True),
    "shared_weight_lora": dict(expert_sharing="lora", expert_lora_rank=4),
}


@pytest.mark.parametrize("recipe", sorted(EXACT_RECIPES))
def test_text_recipes_stay_exact_on_a_vlm(recipe, tmp_path):
    dense = build_llava(tmp_path / "dense")
    options = {"num_experts": 4, "top_k": 2, **EXACT_RECIPES[recipe]}
    result = moe_upcycle.upcycle(dense, tmp_path / "moe", layers="every:2", verify=True, **options)
    assert "the MoE model computes what the dense model did" in result.notes[-1]
    inputs = _inputs(tmp_path / "moe")
    dense_logits, dense_tokens = _run(_load(dense), inputs)
    moe_logits, moe_tokens = _run(_load(tmp_path / "moe"), inputs)
    assert (moe_logits - dense_logits).abs().max() < TOL and torch.equal(moe_tokens, dense_tokens)


def test_drop_upcycling_on_a_vlm_is_reported_inexact(tmp_path):
    dense = build_llava(tmp_path / "dense")
    result = moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="every:2", verify=True,
                                 drop_upcycling_ratio=0.5)
    assert "not expected to be exact" in result.notes[-1] and "drop_upcycling_ratio=0.5" in result.notes[-1]


def test_mix_and_materialize_work_on_a_vlm(tmp_path, capfd):
    """mix of two copies of one LLaVA is exact; shared-weight experts on a LLaVA materialize into full experts."""
    dense = build_llava(tmp_path / "dense")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"gate_mode: random\nallow_identical_sources: true\nexperts:\n  - source_model: {dense}\n"
                      f"  - source_model: {dense}\n")
    assert main(["mix", str(recipe), str(tmp_path / "mixed"), "--verify"]) == 0
    assert "the MoE model computes what the dense model did" in capfd.readouterr().out
    moe_upcycle.upcycle(dense, tmp_path / "lora", num_experts=4, top_k=2, layers="every:2", expert_sharing="lora",
                        expert_lora_rank=4)
    assert main(["materialize", str(tmp_path / "lora"), str(tmp_path / "full")]) == 0
    inputs = _inputs(tmp_path / "full")
    logits = [_run(_load(folder), inputs)[0] for folder in (tmp_path / "lora", tmp_path / "full")]
    assert (logits[0] - logits[1]).abs().max() < TOL
