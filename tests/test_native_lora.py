"""LoRA on a native export keeps every requested target (PEFT would rewrite them for native MoE types)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.export import export_native
from moe_upcycle.train.args import MoeArguments
from moe_upcycle.train.lora import find_targets, prepare_model

from .families import build_dense

TARGETS = "attention,experts,dense_mlp,router"


def _native_qwen3_moe(tmp_path):
    dense = build_dense("qwen3", tmp_path / "dense")
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="0,2")
    export_native(tmp_path / "moe", tmp_path / "native", to="qwen3_moe")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32)


def _adapted(model):
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_lora_on_native_qwen3_moe_keeps_dense_mlp_targets(tmp_path):
    model = _native_qwen3_moe(tmp_path)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    modules, parameters, save = find_targets(model, TARGETS.split(","))
    dense_mlp = [m for m in modules if m.startswith("model.layers.1.mlp.")]
    assert sorted(m.rsplit(".", 1)[-1] for m in dense_mlp) == ["down_proj", "gate_proj", "up_proj"]
    assert parameters == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"] and save == ["mlp.gate"]

    # Plain PEFT rewrites the v5 names as if they were v4 expert projections: the dense MLP loses LoRA.
    plain = get_peft_model(_native_qwen3_moe(tmp_path / "again"), LoraConfig(
        r=4, target_modules=modules, target_parameters=parameters, modules_to_save=save))
    assert not set(dense_mlp) & _adapted(plain)

    peft_model = prepare_model(model, MoeArguments(use_lora=True, lora_r=4, lora_target=TARGETS))
    assert set(modules) <= _adapted(peft_model)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("layers.1.mlp.gate_proj.lora_B" in n for n in grads)
    assert any("experts" in n and "lora" in n for n in grads)
