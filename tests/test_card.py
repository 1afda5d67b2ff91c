"""Model cards: they parse, their metadata is complete, and every figure comes from the run's own files."""

from __future__ import annotations

import json
import re

from huggingface_hub import ModelCard
from safetensors import safe_open

import moe_upcycle
from moe_upcycle.train import run_training

from .families import build_dense


def _numel_from_shards(folder):
    total = experts = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                n = f.get_slice(name).get_shape()
                count = 1
                for d in n:
                    count *= d
                total += count
                experts += count if ".experts." in name else 0
    return total, experts


def test_converter_writes_a_truthful_card(tmp_path):
    dense = build_dense("qwen2", tmp_path / "dense")
    (dense / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="every:2", expert_noise=0.01)
    card = ModelCard.load(tmp_path / "moe" / "README.md", ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0" and meta["base_model_relation"] == "finetune"
    assert {"moe", "upcycled", "mixture-of-experts"} <= set(meta["tags"])
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    total, experts = _numel_from_shards(tmp_path / "moe")
    active = total - experts * (4 - 2) // 4
    text = card.text
    assert f"| parameters | {total:,} total, {active:,} active per token |" in text
    assert f"| experts per MoE layer | {config['num_experts']} |" in text
    assert f"| experts per token (top-k) | {config['num_experts_per_tok']} |" in text
    assert f"| MoE layers | {', '.join(map(str, config['moe_layers']))} (`--layers every:2`) |" in text
    assert "relative Gaussian noise (std 0.01" in text and "computes exactly" not in text
    assert "trust_remote_code=True" in text and "arxiv.org/abs/2212.05055" in text
    assert "moe-upcycle convert" in text and "--expert-noise 0.01" in text


def test_trained_adapter_card_reports_its_measured_metrics(small_models, docs_files, tmp_path):
    _, moe = small_models
    train, valid = docs_files
    run_training(["--model_name_or_path", str(moe), "--train_file", str(train), "--validation_file", str(valid),
                  "--output_dir", str(tmp_path / "run"), "--block_size", "64", "--use_lora", "--max_steps", "3",
                  "--report_to", "none", "--save_strategy", "no", "--max_eval_samples", "8", "--disable_tqdm", "true"])
    card = ModelCard.load(tmp_path / "run" / "README.md", ignore_metadata_errors=False)
    assert card.data.library_name == "peft" and card.data.to_dict()["base_model_relation"] == "adapter"
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    figures = dict(re.findall(r"\| (eval_loss|perplexity) \| ([0-9.]+) \|", card.text))
    assert float(figures["eval_loss"]) == round(results["eval_loss"], 4)
    assert float(figures["perplexity"]) == round(results["perplexity"], 4)
    assert "![Fraction of tokens" in card.text and (tmp_path / "run" / "expert_load.png").is_file()
    assert "3 optimizer steps" in card.text and "moe-upcycle train" in card.text
    assert str(moe) in card.text
