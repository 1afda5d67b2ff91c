"""Shared-weight LoRA experts (``--expert-sharing lora``): exact at conversion, the kernel equals the eager reference
(logits and gradients), ``materialize`` gives the same function as full experts, the card counts the deltas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen2Config

import moe_upcycle
import moe_upcycle.train.evaluate_file  # noqa: F401  (used as moe_upcycle.train.evaluate_file)
from moe_upcycle.cli import main
from moe_upcycle.convert.verify import fixed_batch
from moe_upcycle.modeling.configuration_upcycled_moe import UpcycledMoeConfig
from moe_upcycle.modeling.lora_experts import UpcycledLoraExperts, shared_lora_experts_forward

from .families import VOCAB, build_dense
from .test_families import _assert_same_function
from .test_remote_code import assert_same_logits_without_package

TOL = 1e-5
FAMILIES = ("llama", "qwen2", "phi3", "gpt2")


def _load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def _convert(family, tmp_path, **options):
    dense = build_dense(family, tmp_path / "dense")
    moe = tmp_path / "moe"
    moe_upcycle.upcycle(dense, moe, num_experts=4, top_k=2, expert_sharing="lora", expert_lora_rank=4, **options)
    return dense, moe


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_at_conversion(family, tmp_path):
    dense, moe = _convert(family, tmp_path)
    model = _load(moe)
    assert all(isinstance(block.experts, UpcycledLoraExperts) for block in model.moe_blocks())
    _assert_same_function(_load(dense), model)


def test_exact_after_reload_without_the_package(tmp_path):
    """The same logits with trust_remote_code in a process without the package (and those equal the dense model's:
    test_exact_at_conversion)."""
    folders = {family: _convert(family, tmp_path / family)[1] for family in FAMILIES}
    assert_same_logits_without_package(folders, VOCAB, tmp_path)


def _randomise_deltas(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kernel_equals_reference_in_logits_and_gradients(family, tmp_path):
    _, moe = _convert(family, tmp_path)
    model = _load(moe)
    _randomise_deltas(model)
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=2, seq_len=16)
    results = {}
    for implementation in ("upcycled_default", "eager"):
        model.config._experts_implementation = implementation
        model.zero_grad()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and ".experts." in n}
        results[implementation] = (out.logits.detach(), grads)
    (fast, fast_grads), (ref, ref_grads) = results["upcycled_default"], results["eager"]
    assert torch.isfinite(fast).all() and (fast - ref).abs().max() <= TOL
    assert fast_grads.keys() == ref_grads.keys() and any("_lora_B" in n for n in fast_grads)
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_kernel_is_registered_and_the_block_uses_it():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["shared_lora"] is shared_lora_experts_forward


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_materialize_equals_the_shared_model_and_a_hand_built_one(family, tmp_path, capfd):
    _, moe = _convert(family, tmp_path)
    model = _load(moe)
    _randomise_deltas(model, seed=1)
    model.save_pretrained(tmp_path / "trained")
    assert main(["materialize", str(tmp_path / "trained"), str(tmp_path / "full")]) == 0
    full = _load(tmp_path / "full")
    assert full.config.expert_sharing == "none"
    card = (tmp_path / "full" / "README.md").read_text()  # trained deltas: the card must not claim exactness
    assert "computes exactly what" not in card and "low-rank deltas were trained" in card
    # The same deltas folded by hand into a full-experts model.
    by_hand = _load(tmp_path / "full")
    with torch.no_grad():
        for block, hand in zip(model.moe_blocks(), by_hand.moe_blocks(), strict=True):
            lora = block.experts
            for part in ("up", "down"):
                name = lora.projection(part)
                a, b = getattr(lora.deltas, f"{part}_lora_A"), getattr(lora.deltas, f"{part}_lora_B")
                getattr(hand.experts, name).copy_(getattr(lora, name) + lora.scaling * b @ a)
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=2, seq_len=16)
    real = attention_mask.bool()
    with torch.no_grad():
        logits = [m(input_ids=input_ids, attention_mask=attention_mask).logits[real] for m in (model, full, by_hand)]
    assert (logits[0] - logits[1]).abs().max() <= TOL and (logits[0] - logits[2]).abs().max() <= TOL
    assert (logits[0] - _load(moe)(input_ids=input_ids, attention_mask=attention_mask).logits[real]).abs().max() > 1e-3


def test_export_refuses_shared_weights_and_accepts_the_materialized_model(tmp_path, capfd):
    _, moe = _convert("llama", tmp_path)
    assert main(["export", str(moe), str(tmp_path / "native")]) == 2
    assert "moe-upcycle materialize" in capfd.readouterr().err and not (tmp_path / "native").exists()
    assert main(["materialize", str(moe), str(tmp_path / "full")]) == 0
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "native")]) == 0


def test_card_counts_the_deltas_on_real_shapes():
    """Qwen2.5-0.5B shapes (H 896, I 4864, 24 layers) on the meta device: the experts add L x E x r x (in + out) per
    adapted projection, and nothing else but the routers."""
    text = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    E, r, L, H, I = 8, 8, 24, 896, 4864
    config = UpcycledMoeConfig(text_config=text, num_experts=E, num_experts_per_tok=2, expert_sharing="lora",
                               expert_lora_rank=r, expert_lora_alpha=16.0, expert_lora_targets=["up", "down"])
    with torch.device("meta"):
        moe = moe_upcycle.UpcycledMoeForCausalLM(config)
        dense = AutoModelForCausalLM.from_config(text)
    deltas = sum(p.numel() for n, p in moe.named_parameters() if "_lora_" in n)
    assert deltas == L * E * r * ((H + 2 * I) + (I + H))
    routers = sum(p.numel() for n, p in moe.named_parameters() if n.endswith("gate.weight"))
    assert sum(p.numel() for p in moe.parameters()) == sum(p.numel() for p in dense.parameters()) + deltas + routers
    assert deltas == 25_165_824  # "about 26M parameters" (the issue), against 2.2B for full experts


def test_card_states_the_delta_count(tmp_path):
    _, moe = _convert("llama", tmp_path)
    L, E, r, H, I = 3, 4, 4, 32, 48  # tests/families.py llama
    card = (moe / "README.md").read_text()
    assert f"the deltas hold {L * E * r * ((H + 2 * I) + (I + H)):,} parameters" in card


@pytest.fixture(scope="module")
def shared_model(small_models, tmp_path_factory):
    """The small pre-trained dense Llama (tests/conftest.py), upcycled with shared-weight experts."""
    dense, _ = small_models
    out = tmp_path_factory.mktemp("shared") / "moe"
    moe_upcycle.upcycle(dense, out, num_experts=4, top_k=2, expert_sharing="lora", expert_lora_rank=8)
    return out


def test_training_changes_only_deltas_and_routers(shared_model, docs_files, tmp_path):
    train, valid = docs_files
    (tmp_path / "train.txt").write_text(train.read_text()[:20000])
    (tmp_path / "valid.txt").write_text(valid.read_text()[:4000])
    run = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(shared_model), "--train_file", str(tmp_path / "train.txt"),
            "--validation_file", str(tmp_path / "valid.txt"), "--output_dir", str(run), "--block_size", "64",
            "--per_device_train_batch_size", "8", "--max_steps", "12", "--learning_rate", "3e-3",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
            "--eval_strategy", "no"]
    before = {}
    for shard in sorted(shared_model.glob("*.safetensors")):
        before |= load_file(shard)
    assert main(argv) == 0
    after = {}
    for shard in sorted(run.glob("*.safetensors")):
        after |= load_file(shard)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "training changed nothing"
    assert all("deltas." in name or name.endswith(".mlp.gate.weight") for name in changed), sorted(changed)[:5]
    assert any("_lora_B" in name for name in changed), "the deltas did not train"
    results = json.loads((run / "all_results.json").read_text()) if (run / "all_results.json").is_file() else {}
    losses = [moe_upcycle.train.evaluate_file.evaluate_file(str(m), str(tmp_path / "valid.txt"), block_size=64)["eval_loss"]
              for m in (shared_model, run)]
    assert losses[1] < losses[0], (losses, results)


def test_lora_training_saves_only_what_trained(shared_model, docs_files, tmp_path):
    train, _ = docs_files
    (tmp_path / "train.txt").write_text(train.read_text()[:6000])
    run = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(shared_model), "--train_file", str(tmp_path / "train.txt"),
            "--output_dir", str(run), "--block_size", "64", "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--use_lora", "--lora_target", "attention", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    assert main(argv) == 0
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert sorted(adapter["modules_to_save"]) == ["mlp.experts.deltas", "mlp.gate"]
    saved = load_file(run / "adapter_model.safetensors")
    assert any("deltas" in n and "_lora_B" in n for n in saved) and any("q_proj.lora_A" in n for n in saved)
    assert not [n for n in saved if ".experts." in n and "deltas" not in n], "the shared MLP must not be saved"
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    assert _load(tmp_path / "merged").moe_blocks()[0].experts.deltas.up_lora_B.abs().sum() > 0


@pytest.mark.parametrize(("options", "needle"), [
    (dict(granularity=2, num_experts=4, top_k=2), "expert_sharing='lora' is invalid"),
    (dict(expert_noise=0.1), "expert_sharing='lora' is invalid"),
    (dict(expert_lora_rank=0), "expert_lora_rank=0 is invalid"),
    (dict(expert_lora_alpha=-1.0), "expert_lora_alpha=-1.0 is invalid"),
    (dict(expert_lora_targets="up,sideways"), "expert_lora_targets='up,sideways' is invalid"),
    (dict(expert_lora_targets="gate_up,up"), "distinct"),
])
def test_refused_combinations(options, needle):
    with pytest.raises(moe_upcycle.errors.InvalidOptionError, match=needle):
        moe_upcycle.UpcycleOptions(**{"expert_sharing": "lora", **options})


def test_gate_up_is_another_name_of_up():
    options = moe_upcycle.UpcycleOptions(expert_sharing="lora", expert_lora_targets="gate_up")
    assert options.lora_targets == ["up"] and options.expert_lora_alpha == 16.0
