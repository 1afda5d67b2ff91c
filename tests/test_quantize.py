"""``moe-upcycle quantize`` (issue 16): experts stored in 8, 4 or 2 bits, or a precision per expert from data.

The quantised model computes exactly what the float model holding the dequantised experts computes; every other
tensor is the input's, byte for byte; the files are the size the schemes say; ``--bits auto`` keeps its budget and
gives the most used expert the most bits; LoRA trains around frozen integer experts; bad options are refused in one
line with nothing written; ``export`` refuses, or writes the dequantised values with ``--dequantize``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.checkpoint import SafetensorsCheckpoint
from moe_upcycle.cli import main
from moe_upcycle.convert.precision import allocate
from moe_upcycle.convert.verify import fixed_batch
from moe_upcycle.modeling.quantized_experts import QUANT_SCHEMES, UpcycledQuantizedExperts

from .hostile import failure_problems, run_inprocess, snapshot, tree_problems

TOL = 1e-5


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def _is_expert_weight(name: str) -> bool:
    return ".experts." in name and not name.endswith("_bias")


@pytest.fixture(scope="module")
def data(docs_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "data.txt"
    path.write_text(docs_files[1].read_text()[:6000])
    return path


@pytest.fixture(scope="module")
def quantized(small_models, tmp_path_factory):
    """The small 4-expert model quantised with each uniform scheme."""
    _, moe = small_models
    folder = tmp_path_factory.mktemp("quantized")
    for scheme in QUANT_SCHEMES:
        assert main(["quantize", str(moe), str(folder / scheme), "--experts", scheme]) == 0
    return moe, folder


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_quantised_model_equals_the_float_model_with_dequantised_experts(quantized, scheme):
    source, folder = quantized
    out = folder / scheme
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    blocks = [m for m in model.modules() if isinstance(m, UpcycledQuantizedExperts)]
    assert len(blocks) == len(model.config.moe_layers) == 2
    float_experts = [block.experts for block in reference.moe_blocks()]
    with torch.no_grad():
        for quantised, dense in zip(blocks, float_experts, strict=True):
            for name in quantised.shapes:
                getattr(dense, name).copy_(quantised.dequantized(name))
    input_ids, mask = fixed_batch(model.config.text_config.vocab_size)  # row 1 left-padded
    with torch.no_grad():
        ours, theirs = model(input_ids=input_ids, attention_mask=mask).logits, reference(
            input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(ours[real]).all() and (ours[real] - theirs[real]).abs().max() < TOL
    # and it is not the float model: the experts really are rounded
    plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (plain(input_ids=input_ids, attention_mask=mask).logits[real] - ours[real]).abs().max() > 1e-6


@pytest.mark.parametrize("scheme", list(QUANT_SCHEMES))
def test_every_other_tensor_is_the_inputs_and_every_element_is_within_half_its_scale(quantized, scheme):
    source, folder = quantized
    before, after = _tensors(source), _tensors(folder / scheme)
    kept = {name for name in before if not _is_expert_weight(name)}
    assert kept and kept <= after.keys()
    for name in kept:  # routers, attention, norms, embeddings, biases: byte for byte
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    spec, group = QUANT_SCHEMES[scheme], 64
    for name in (n for n in before if _is_expert_weight(n)):
        codes, scale = after[f"{name}_{scheme}"], after[f"{name}_{scheme}_scale"]
        weight = before[name].float()  # [E, out, in]
        restored = spec.dequantize(codes, scale, group, torch.float32)
        per_element = scale.repeat_interleave(weight.shape[-1] // scale.shape[-1], dim=-1)
        assert ((restored - weight).abs() <= per_element * (0.5 + 1e-5)).all(), name


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_expert_files_are_within_five_percent_of_the_theoretical_size(quantized, scheme):
    """Bytes on disk (shard files, headers included) minus the unchanged tensors, against codes of ``bits`` per
    weight plus one float32 scale per row (int8) or per 64 input columns (int4)."""
    source, folder = quantized
    out = folder / scheme
    on_disk = sum(os.path.getsize(f) for f in out.glob("*.safetensors"))
    info = SafetensorsCheckpoint(out).info
    kept = sum(t.nbytes for name, t in info.items() if not _is_expert_weight(name))
    weights = {name: t.shape for name, t in SafetensorsCheckpoint(source).info.items() if _is_expert_weight(name)}
    bits = QUANT_SCHEMES[scheme].bits
    theoretical = sum(e * o * i * bits / 8 + e * o * (1 if scheme == "int8" else i // 64) * 4
                      for e, o, i in weights.values())
    assert abs((on_disk - kept) - theoretical) <= 0.05 * theoretical, (on_disk - kept, theoretical)
    source_bytes = sum(e * o * i * 4 for e, o, i in weights.values())  # the float32 experts they replace
    assert theoretical < source_bytes * (bits + 1) / 32


def test_card_states_the_scheme_and_export_refuses_or_dequantises(quantized, tmp_path):
    _, folder = quantized
    out = folder / "int4"
    config = json.loads((out / "config.json").read_text())
    record = config["upcycling"]["quantized"]
    assert record["scheme"] == "int4" and record["group_size"] == config["expert_group_size"] == 64
    assert config["expert_precision"] == {"0": ["int4"] * 4, "1": ["int4"] * 4}
    card = (out / "README.md").read_text()
    assert "4.5 bits per expert weight" in card and "moe-upcycle quantize" in card and "8 int4 expert(s)" in card
    before = snapshot(tmp_path)
    assert main(["export", str(out), str(tmp_path / "native")]) != 0  # refused: native classes hold float experts
    assert not tree_problems(tmp_path, before, snapshot(tmp_path))
    assert main(["export", str(out), str(tmp_path / "native"), "--dequantize"]) == 0
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native", dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(native).__name__ == "MixtralForCausalLM"
    input_ids, mask = fixed_batch(ours.config.text_config.vocab_size)
    with torch.no_grad():
        diff = native(input_ids=input_ids, attention_mask=mask).logits - ours(input_ids=input_ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() < TOL


# -- --bits auto -------------------------------------------------------------------------------------------------

def test_allocation_keeps_the_budget_and_upgrades_the_most_sensitive_first():
    cost = torch.tensor([[[2.0, 4.0, 8.0]] * 4], dtype=torch.float64)  # [L=1, E=4, S=3]
    error = torch.tensor([[[100.0, 10.0, 0.0], [1.0, 0.1, 0.0], [2.0, 0.2, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    assert allocate(error, cost, budget=8.0).tolist() == [[0, 0, 0, 0]]  # only the cheapest fits
    assert allocate(error, cost, budget=10.0).tolist() == [[1, 0, 0, 0]]
    choice = allocate(error, cost, budget=20.0)
    assert choice.tolist() == [[2, 1, 1, 0]]  # an unused expert (no error) never gets more bits
    assert cost.gather(-1, choice[..., None]).sum() <= 20.0


@pytest.fixture(scope="module")
def favoured(small_models, tmp_path_factory):
    """The small dense model upcycled with a sigmoid router whose selection bias sends every token to expert 0."""
    dense, _ = small_models
    folder = tmp_path_factory.mktemp("favoured")
    moe_upcycle.upcycle(dense, folder / "moe", num_experts=4, top_k=2, router_type="sigmoid")
    tensors = _tensors(folder / "moe")
    biases = [name for name in tensors if name.endswith("gate.e_score_correction_bias")]
    assert len(biases) == 2
    for name in biases:
        tensors[name] = torch.tensor([100.0, 0.0, 0.0, 0.0])
    for shard in (folder / "moe").glob("*.safetensors"):
        shard.unlink()
    save_file(tensors, folder / "moe" / "model.safetensors", metadata={"format": "pt"})
    (folder / "moe" / "model.safetensors.index.json").unlink(missing_ok=True)
    return folder / "moe"


@pytest.mark.parametrize("target", [3.5, 6.0])  # group 32: int2 costs 3 bits, int4 5, int8 8.25
def test_auto_bits_keep_the_budget_and_favour_the_expert_that_takes_most_tokens(favoured, data, tmp_path, target):
    out = tmp_path / "auto"
    assert main(["quantize", str(favoured), str(out), "--bits", "auto", "--target-bits", str(target), "--data",
                 str(data), "--block-size", "64", "--group-size", "32"]) == 0
    config = json.loads((out / "config.json").read_text())
    record, precision = config["upcycling"]["quantized"], config["expert_precision"]
    assert record["scheme"] == "auto" and record["target_bits"] == target
    # the budget, as stored and as the files hold it
    info = SafetensorsCheckpoint(out).info
    numel = sum(math.prod(t.shape) for name, t in SafetensorsCheckpoint(favoured).info.items() if _is_expert_weight(name))
    stored_bits = 8 * sum(t.nbytes for name, t in info.items() if _is_expert_weight(name))
    assert record["average_bits"] == pytest.approx(stored_bits / numel, abs=1e-3) and stored_bits / numel <= target
    rank = {name: QUANT_SCHEMES[name].bits if name in QUANT_SCHEMES else 32 for name in ("int2", "int4", "int8", "float")}
    for layer, row in precision.items():
        assert record["usage"][layer][0] == max(record["usage"][layer])  # every token chose expert 0
        assert all(rank[row[0]] >= rank[other] for other in row[1:]), row  # ... so it never has fewer bits
    # the budget is spent across layers where it removes the most error, and expert 0 is always among the first
    assert any(rank[row[0]] > min(rank[other] for other in row[1:]) for row in precision.values()), precision
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    input_ids, mask = fixed_batch(model.config.text_config.vocab_size)
    assert torch.isfinite(model(input_ids=input_ids, attention_mask=mask).logits).all()


# -- QLoRA-style training ----------------------------------------------------------------------------------------

def test_lora_on_int8_experts_lowers_validation_loss_and_keeps_the_integers(quantized, docs_files, tmp_path):
    _, folder = quantized
    source = folder / "int8"
    train, valid = docs_files
    run = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(source), "--train_file", str(train), "--validation_file",
                 str(valid), "--output_dir", str(run), "--use_lora", "true", "--block_size", "64",
                 "--per_device_train_batch_size", "16", "--max_steps", "60", "--learning_rate", "3e-3",
                 "--eval_strategy", "steps", "--eval_steps", "60", "--eval_on_start", "true", "--max_eval_samples", "16",
                 "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                 "--dataloader_pin_memory", "false"]) == 0
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.05, losses
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    before, after = _tensors(source), _tensors(tmp_path / "merged")
    integers = [name for name, t in before.items() if not t.is_floating_point()]
    assert integers and all(torch.equal(before[name], after[name]) for name in integers)
    assert any(not torch.equal(before[name], after[name]) for name in before if "self_attn" in name)


# -- refusals ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "words"), [
    (["--experts", "int4", "--group-size", "48"], "--group-size 48 does not fit"),
    (["--experts", "int4", "--group-size", "7"], "even integer"),
    (["--experts", "int3"], "invalid choice: 'int3'"),
    (["--bits", "auto", "--target-bits", "5"], "--bits auto needs"),
    (["--experts", "int8", "--bits", "auto", "--target-bits", "5", "--data", "x.txt"], "give one"),
    (["--experts", "int8", "--target-bits", "5"], "add --bits auto"),
])
def test_bad_options_are_refused_in_one_line_with_nothing_written(small_models, tmp_path, capfd, flags, words):
    _, moe = small_models
    before = snapshot(moe)
    outcome = run_inprocess(["quantize", str(moe), str(tmp_path / "out"), *flags], capfd)
    assert not failure_problems(outcome), outcome.describe()
    assert words in outcome.err, outcome.err
    assert not (tmp_path / "out").exists() and not tree_problems(moe, before, snapshot(moe))


def test_a_dense_or_already_quantised_input_is_refused(small_models, quantized, tmp_path, capfd):
    dense, _ = small_models
    outcome = run_inprocess(["quantize", str(dense), str(tmp_path / "a"), "--experts", "int8"], capfd)
    assert not failure_problems(outcome) and "not an upcycled MoE one" in outcome.err, outcome.describe()
    _, folder = quantized
    outcome = run_inprocess(["quantize", str(folder / "int8"), str(tmp_path / "b"), "--experts", "int4"], capfd)
    assert not failure_problems(outcome) and "already quantised" in outcome.err, outcome.describe()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
