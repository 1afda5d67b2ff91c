"""Upcycled checkpoints export to their native Transformers MoE twins, which load and compute the same logits
in a process that cannot import moe_upcycle; checkpoints without an exact twin are refused before anything is written."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.commands.export import add as add_export_subcommand
from moe_upcycle.convert.verify import fixed_batch
from moe_upcycle.errors import OutputExistsError, UpcycleError
from moe_upcycle.export import NATIVE_TARGETS, ExportError, export_native

from .families import VOCAB, build_dense

TOL = 1e-5

# (case id, dense family, config overrides, upcycled layers, --to, native class)
EXPORTS = [
    ("llama", "llama", {}, "all", "auto", "MixtralForCausalLM"),
    ("mistral", "mistral", {"sliding_window": 6}, "all", "mixtral", "MixtralForCausalLM"),
    ("qwen2", "qwen2", {}, "all", "auto", "Qwen2MoeForCausalLM"),
    ("qwen2_partial_swa", "qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, "0,2",
     "qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3", "qwen3", {"head_dim": 16}, "all", "auto", "Qwen3MoeForCausalLM"),
    ("qwen3_partial_swa", "qwen3", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0}, "1",
     "qwen3_moe", "Qwen3MoeForCausalLM"),
    ("olmo2", "olmo2", {}, "all", "flex_olmo", "FlexOlmoForCausalLM"),
    ("granite", "granite", {}, "all", "auto", "GraniteMoeForCausalLM"),
]

CHILD = r"""
import json, sys
sys.modules["moe_upcycle"] = None  # importing it now raises ImportError
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
batch = load_file(sys.argv[2])
logits, classes = {}, {}
for name, path in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    classes[name] = f"{type(model).__module__}.{type(model).__name__}"
    with torch.no_grad():
        logits[name] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.contiguous()
save_file(logits, sys.argv[3])
with open(sys.argv[4], "w") as f:
    json.dump(classes, f)
"""


def _upcycled(tmp_path, family, layers="all", expert_noise=0.0, **overrides):
    dense = build_dense(family, tmp_path / "dense", **overrides)
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers=layers, expert_noise=expert_noise)
    return tmp_path / "moe"


def test_exports_load_natively_without_the_package(tmp_path):
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=3, seq_len=20)  # row 1 is left-padded
    jobs, expected = {}, {}
    for case, family, overrides, layers, to, _ in EXPORTS:
        # Noisy experts differ from each other, so routing (which experts, which weights) must match too.
        moe_dir = _upcycled(tmp_path / case, family, layers, expert_noise=0.2, **overrides)
        (moe_dir / "special_tokens_map.json").write_text("{}")  # stands in for the tokenizer files
        out = tmp_path / case / "native"
        result = export_native(moe_dir, out, to=to, max_shard_size="40KB")
        assert result.target == NATIVE_TARGETS[result.target].name and result.source_family == family
        assert len(result.shards) > 1 and (out / "model.safetensors.index.json").is_file()
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == result.target and "auto_map" not in config
        assert config["architectures"] == [result.architecture] and config["output_router_logits"] is False
        assert not list(out.glob("*.py"))
        assert {"special_tokens_map.json", "generation_config.json"} <= set(result.copied_files)
        assert (out / "special_tokens_map.json").is_file()
        assert any("router_z_loss_coef=0.001" in note for note in result.notes)
        model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            expected[case] = model(input_ids=input_ids, attention_mask=attention_mask).logits
        jobs[case] = str(out)

    save_file({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "batch.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(jobs), str(tmp_path / "batch.safetensors"),
         str(tmp_path / "logits.safetensors"), str(tmp_path / "classes.json")],
        check=True, env=env, cwd=tmp_path,
    )
    got = load_file(tmp_path / "logits.safetensors")
    classes = json.loads((tmp_path / "classes.json").read_text())
    real = attention_mask.bool()
    for case, *_, native_class in EXPORTS:
        assert classes[case].startswith("transformers.models.") and classes[case].endswith(f".{native_class}"), classes[case]
        diff = (got[case][real] - expected[case][real]).abs().max().item()
        print(f"{case}: {native_class} max |logit diff| {diff:.3g}")
        assert diff <= TOL, (case, diff)


# (dense family, config overrides, upcycled layers, --to, expected reason)
REFUSALS = [
    ("llama", {}, "0,2", "auto", r"every Mixtral layer is a MoE layer, but layers \[1\]"),
    ("olmo2", {}, "1", "flex_olmo", r"every FlexOlmo layer is a MoE layer, but layers \[0, 2\]"),
    ("llama", {"attention_bias": True}, "all", "auto", r"Mixtral's attention projections have no biases \(attention_bias=True"),
    ("llama", {"mlp_bias": True}, "all", "mixtral", r"Mixtral's experts have no biases \(mlp_bias=True"),
    ("granite", {"mlp_bias": True}, "all", "auto", r"GraniteMoE's experts have no biases"),
    ("gemma", {}, "all", "auto", r"Gemma has no native MoE twin"),
    ("gemma2", {}, "all", "auto", r"Gemma 2 has no native MoE twin.*soft-capping"),
    ("gemma3_text", {}, "all", "auto", r"Gemma 3 has no native MoE twin"),
    ("gpt2", {}, "all", "auto", r"GPT-2 has no native MoE twin.*non-gated MLPs with biases"),
    ("gpt_neox", {}, "all", "auto", r"GPT-NeoX has no native MoE twin.*parallel"),
    ("phi3", {}, "all", "auto", r"PhiMoE uses LayerNorm.*sparsemixer"),
    ("olmo2", {}, "all", "olmoe", r"OLMoE is not an exact twin of OLMo 2.*pre-norm.*--to flex_olmo"),
    ("qwen2", {}, "all", "mixtral", r"Mixtral is the twin of llama, mistral only; the twin of qwen2 is 'qwen2_moe'"),
    ("llama", {}, "all", "deepseek_v3", r"unknown export target 'deepseek_v3': expected one of auto, mixtral, qwen2_moe"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}, "all", "auto",
     r"Qwen3-MoE applies the sliding window to every layer or to none, but this Qwen3 slides it on layers \[1, 2\]"),
]


@pytest.mark.parametrize(("family", "overrides", "layers", "to", "reason"), REFUSALS,
                         ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(REFUSALS)])
def test_refusals_say_why_and_write_nothing(tmp_path, family, overrides, layers, to, reason):
    moe_dir = _upcycled(tmp_path / "src", family, layers, **overrides)
    out = tmp_path / "exports" / "native"
    with pytest.raises(ExportError, match=reason) as info:
        export_native(moe_dir, out, to=to)
    assert isinstance(info.value, UpcycleError)
    assert not (tmp_path / "exports").exists(), "a refused export must not create anything"


def test_not_an_upcycled_checkpoint(tmp_path):
    dense = build_dense("llama", tmp_path / "dense")
    with pytest.raises(ExportError, match="'llama' checkpoint, not an upcycled one"):
        export_native(dense, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_shapes_are_checked_before_writing(tmp_path):
    moe_dir = _upcycled(tmp_path, "llama")
    config = json.loads((moe_dir / "config.json").read_text())
    config["num_experts"] = 3  # the weights still hold 4 experts
    (moe_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"wrong shape for MixtralForCausalLM: model\.layers\.0\.mlp\.gate\.weight \[4, 32\] "
                                          r"\(expected \[3, 32\]\)"):
        export_native(moe_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_subcommand_and_overwrite(tmp_path, capsys):
    moe_dir = _upcycled(tmp_path, "granite")
    parser = argparse.ArgumentParser(prog="moe-upcycle")
    add_export_subcommand(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "native"
    args = parser.parse_args(["export", str(moe_dir), str(out), "--to", "granitemoe", "--max-shard-size", "30KB"])
    assert args.func(args) == 0
    summary, *notes = capsys.readouterr().out.strip().splitlines()
    assert "GraniteMoeForCausalLM" in summary and str(out) in summary
    assert notes and all(line.startswith("note: ") for line in notes)  # what the export could not carry over
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(OutputExistsError):
        export_native(moe_dir, out)
    result = export_native(moe_dir, out, overwrite=True)
    assert result.shards == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(moe_dir), str(out), "--to", "olmoe"])
