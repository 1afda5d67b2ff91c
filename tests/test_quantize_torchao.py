"""``moe-upcycle quantize --backend torchao`` (issue 16, point 4): the experts in torchao's int8 weight-only format.

Without torchao: the backend is refused in one line, as are the options it does not take (those tests always run).
With torchao: the output is safetensors that load with ``from_pretrained`` (package imported, and
``trust_remote_code`` without it) on the eager experts kernel, which config.json pins; only the expert tensors
changed; the logits are those of the float model holding torchao's dequantised experts, and close to the float
model's.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_upcycle.checkpoint import PICKLE_SUFFIXES
from moe_upcycle.cli import main
from moe_upcycle.convert.quantize_torchao import MISSING
from moe_upcycle.convert.verify import fixed_batch

from .hostile import failure_problems, run_inprocess, snapshot, tree_problems
from .test_remote_code import assert_same_logits_without_package

EXACT = 1e-5  # against the float model holding the dequantised experts (measured 1.4e-6: float32 summation order)
# Against the float model itself: every weight is off by at most half its row's scale (|row|max / 255), measured
# max |diff| 8.3e-4 on logits of magnitude up to 3.1, relative norm 6.9e-5 (the native int8 scheme: 3.1e-3).
CLOSE, RELATIVE = 1e-2, 1e-3


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def _expert_weight(name: str) -> bool:
    return ".experts." in name and not name.endswith("_bias")


# -- refusals: always run ----------------------------------------------------------------------------------------

def test_missing_torchao_is_refused_in_one_line_with_nothing_written(small_models, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` now raises ImportError, as when absent
    _, moe = small_models
    before = snapshot(moe)
    outcome = run_inprocess(["quantize", moe, tmp_path / "out", "--backend", "torchao"], capfd)
    assert not failure_problems(outcome), outcome.describe()
    assert outcome.err.strip().splitlines()[-1] == f"moe-upcycle: error: {MISSING}"
    assert not (tmp_path / "out").exists() and not tree_problems(moe, before, snapshot(moe))


@pytest.mark.parametrize(("flags", "words"), [
    (["--experts", "int4"], "--experts int4 needs the default native backend"),
    (["--experts", "int2"], "--experts int2 needs the default native backend"),
    (["--bits", "auto", "--target-bits", "5", "--data", "x.txt"], "only the native backend stores"),
    (["--bits", "auto"], "only the native backend stores"),
    (["--backend", "bitsandbytes"], "invalid choice: 'bitsandbytes'"),
])
def test_options_the_torchao_backend_does_not_take_are_refused(small_models, tmp_path, capfd, flags, words):
    _, moe = small_models
    outcome = run_inprocess(["quantize", moe, tmp_path / "out", "--backend", "torchao", *flags], capfd)
    assert not failure_problems(outcome), outcome.describe()
    assert words in outcome.err, outcome.err
    assert not (tmp_path / "out").exists()


# -- with torchao ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torchao_model(small_models, tmp_path_factory):
    """The small 4-expert model quantised by torchao."""
    pytest.importorskip("torchao", minversion="0.18")
    _, moe = small_models
    out = tmp_path_factory.mktemp("torchao") / "int8"
    assert main(["quantize", str(moe), str(out), "--backend", "torchao"]) == 0
    return moe, out


def test_output_is_safetensors_with_only_the_expert_tensors_changed(torchao_model):
    source, out = torchao_model
    assert not [p.name for p in out.iterdir() if p.name.endswith(PICKLE_SUFFIXES)]
    before, after = _tensors(source), _tensors(out)
    kept = {name for name in before if not _expert_weight(name)}
    assert any(".gate." in n for n in kept) and any("self_attn" in n for n in kept) and any("embed" in n for n in kept)
    for name in kept:  # routers, attention, norms, embeddings, lm_head: byte for byte
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    experts = [name for name in before if _expert_weight(name)]
    assert len(experts) == 4 and not set(experts) & after.keys()
    for name in experts:  # torchao's flattened Int8Tensor: codes, a scale and a zero point per output row
        module, _, param = name.rpartition(".")
        codes, scale, zero = (after[f"{module}._{param}_{part}"] for part in ("qdata", "scale", "zero_point"))
        weight = before[name]  # [E, out, in]
        assert codes.dtype == torch.int8 and codes.shape == weight.shape and scale.shape == (*weight.shape[:2], 1)
        assert not zero.any()  # symmetric
        assert ((codes.float() * scale - weight).abs() <= scale * (0.5 + 1e-5)).all(), name
    with safe_open(next(out.glob("*.safetensors")), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata[experts[0]])["_type"] == "Int8Tensor"
    config = json.loads((out / "config.json").read_text())
    record = config["upcycling"]["quantized"]
    assert record["backend"] == "torchao" and record["scheme"] == "int8" and record["float_dtype"] == "float32"
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert 8 < record["average_bits"] < 9  # int8 codes plus a float32 scale and an int8 zero point per row
    card = (out / "README.md").read_text()
    assert "torchao" in card and "--backend torchao" in card and f"{record['average_bits']} bits" in card


def test_output_loads_on_the_pinned_kernel_and_is_close_to_the_float_model(torchao_model):
    from torchao.utils import TorchAOBaseTensor

    source, out = torchao_model
    assert json.loads((out / "config.json").read_text())["experts_implementation"] == "eager"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config._experts_implementation == "eager"
    blocks = model.moe_blocks()
    assert len(blocks) == 2 and all(isinstance(b.experts.gate_up_proj, TorchAOBaseTensor) for b in blocks)
    assert not any(isinstance(p, TorchAOBaseTensor) for name, p in model.named_parameters() if ".experts." not in name)
    plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for quantised, dense in zip(blocks, reference.moe_blocks(), strict=True):
            for name in ("gate_up_proj", "down_proj"):
                getattr(dense.experts, name).copy_(getattr(quantised.experts, name).dequantize())
    input_ids, mask = fixed_batch(model.config.text_config.vocab_size)  # row 1 left-padded
    real = mask.bool()
    with torch.no_grad():
        ours, theirs, float_logits = (m(input_ids=input_ids, attention_mask=mask).logits[real]
                                      for m in (model, reference, plain))
    assert torch.isfinite(ours).all() and (ours - theirs).abs().max() < EXACT
    diff = ours - float_logits
    assert 1e-6 < diff.abs().max() < CLOSE and diff.norm() / float_logits.norm() < RELATIVE


def test_another_experts_kernel_is_refused_in_one_line(torchao_model):
    _, out = torchao_model
    with pytest.raises(ValueError, match="cannot run this model's torchao-quantised experts"):
        AutoModelForCausalLM.from_pretrained(out, experts_implementation="sorted_mm")
    model = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    with pytest.raises(ValueError, match="cannot run this model's torchao-quantised experts"):
        model.set_experts_implementation("grouped_mm")
    assert model.config._experts_implementation == "eager"


def test_output_loads_with_trust_remote_code_without_the_package(torchao_model, tmp_path):
    _, out = torchao_model
    assert_same_logits_without_package({"torchao": out}, json.loads((out / "config.json").read_text())
                                       ["text_config"]["vocab_size"], tmp_path)


@pytest.mark.parametrize(("argv", "words"), [
    (["quantize", "{out}", "{tmp}/a", "--experts", "int4"], "is already quantised (by torchao)"),
    (["quantize", "{out}", "{tmp}/a", "--backend", "torchao"], "is already quantised (by torchao)"),
    (["export", "{out}", "{tmp}/a", "--dequantize"], "quantised by torchao"),
])
def test_a_torchao_output_is_refused_as_input(torchao_model, tmp_path, capfd, argv, words):
    _, out = torchao_model
    outcome = run_inprocess([a.format(out=out, tmp=tmp_path) for a in argv], capfd)
    assert not failure_problems(outcome) and words in outcome.err, outcome.describe()
    assert not (tmp_path / "a").exists()
