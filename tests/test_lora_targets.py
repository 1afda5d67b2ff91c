"""``--lora_target``: its spellings name the same targets, and each group finds its modules on an upcycled decoder, an
upcycled encoder, native Mixtral / Qwen2-MoE models and dense models; an unknown group is one line."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, BertModel

import moe_upcycle
from moe_upcycle.cli import main
from moe_upcycle.errors import InvalidOptionError
from moe_upcycle.train.args import MoeArguments, parse_train_args
from moe_upcycle.train.lora import resolved_targets_kept
from moe_upcycle.train.lora_targets import LORA_TARGET_GROUPS, find_targets

from .families import VOCAB, build_dense
from .test_errors_train import _fails, _train_argv, text  # noqa: F401  (text is a fixture)

GROUPS = ["attention", "experts", "router"]


def _parsed(tmp_path, *argv: str, recipe: str | None = None) -> MoeArguments:
    config = []
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        config = ["--config", str(tmp_path / "recipe.yaml")]
    return parse_train_args([*config, "--model_name_or_path", "m", "--output_dir", str(tmp_path / "run"), *argv])[2]


@pytest.mark.parametrize("argv, recipe", [
    (["--lora_target", "attention", "experts", "router"], None),
    (["--lora_target", "attention,experts,router"], None),
    (["--lora_target", "attention", "experts,router"], None),
    (["--lora-target", "attention, experts ,router"], None),
    ([], "lora_target: [attention, experts, router]\n"),
    ([], "lora_target: attention,experts,router\n"),
    ([], "lora_target: attention experts router\n"),
    ([], None),  # the default
], ids=["list", "comma", "mixed", "comma_spaces", "yaml_list", "yaml_string", "yaml_spaces", "default"])
def test_every_spelling_names_the_same_targets(tmp_path, argv, recipe):
    assert _parsed(tmp_path, *argv, recipe=recipe).lora_target == GROUPS


def test_groups_and_module_names_mix_and_the_command_line_overrides_a_recipe(tmp_path):
    moe = _parsed(tmp_path, "--lora_target", "attention", "gate_proj,up_proj", recipe="lora_target: [experts]\n")
    assert moe.lora_target == ["attention", "gate_proj", "up_proj"]
    assert MoeArguments(lora_target="attention,experts").lora_target == ["attention", "experts"]


@pytest.mark.parametrize("recipe, needle", [
    ("lora_target: [attention, 5]\n", "lora_target=['attention', 5] is invalid: expected a string or a list of strings"),
    ("lora_target: [[attention]]\n", "lora_target=[['attention']] is invalid"),
    ("use_lora: true\nlora_target: []\n", "lora_target='' names nothing to adapt: give groups (attention, experts, "
                                          "dense_mlp, router, expert_deltas)"),
])
def test_a_recipe_value_that_names_nothing_is_refused(tmp_path, recipe, needle):
    with pytest.raises(InvalidOptionError) as info:
        _parsed(tmp_path, recipe=recipe)
    assert needle in str(info.value)


# ------------------------------------------------------------------------------------------------ the groups
def _native(config_type: str, **fields) -> Callable[[], nn.Module]:
    config = AutoConfig.for_model(config_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **fields)
    return lambda: AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Callable[[], nn.Module]]:
    """Builders of fresh models: three-layer upcycled ones with MoE layers 0 and 2 (a decoder and a BERT encoder),
    two-layer native MoE ones (Qwen2-MoE with a dense layer 1 and a shared expert), dense decoders (OPT's MLP is not a
    module)."""
    folder = tmp_path_factory.mktemp("lora_targets")
    moe_upcycle.upcycle(build_dense("llama", folder / "llama"), folder / "llama_moe", num_experts=4, top_k=2, layers="0,2")
    moe_upcycle.upcycle(folder / "llama", folder / "llama_shared", num_experts=4, top_k=2, layers="0,2",
                        expert_sharing="lora", expert_lora_rank=2)
    build_dense("opt", folder / "opt")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4)).save_pretrained(folder / "bert")
    moe_upcycle.upcycle(folder / "bert", folder / "bert_moe", num_experts=4, top_k=2, layers="0,2")
    return {
        "upcycled": lambda: AutoModelForCausalLM.from_pretrained(folder / "llama_moe"),
        "upcycled_shared": lambda: AutoModelForCausalLM.from_pretrained(folder / "llama_shared"),
        "upcycled_encoder": lambda: AutoModelForMaskedLM.from_pretrained(folder / "bert_moe"),
        "mixtral": _native("mixtral", num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": _native("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             shared_expert_intermediate_size=24, mlp_only_layers=[1]),
        "dense": lambda: AutoModelForCausalLM.from_pretrained(folder / "llama"),
        "dense_opt": lambda: AutoModelForCausalLM.from_pretrained(folder / "opt"),
    }


def _in_layers(names: list[str]) -> list[str]:
    """``model.model.layers.1.mlp.up_proj`` -> ``1.mlp.up_proj``: the name inside its layer, whatever the model wraps."""
    return sorted(re.sub(r"^.*?\.(?:layers|layer)\.(\d+)\.", r"\1.", name) for name in names)


def _each(layers, *names) -> list[str]:
    return sorted(f"{i}.{name}" for i in layers for name in names)


LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
GATED_EXPERTS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
NO_MOE = InvalidOptionError
EXPECTED = {  # group -> model -> names inside their layer, expert parameter names, router names, or an error
    "attention": {
        "upcycled": _each(range(3), *LLAMA_ATTENTION), "mixtral": _each(range(2), *LLAMA_ATTENTION),
        "upcycled_shared": _each(range(3), *LLAMA_ATTENTION),
        "qwen2_moe": _each(range(2), *LLAMA_ATTENTION), "dense": _each(range(3), *LLAMA_ATTENTION),
        "upcycled_encoder": _each(range(3), "attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense"),
        "dense_opt": _each(range(3), "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    },
    "experts": {
        "upcycled": GATED_EXPERTS, "mixtral": GATED_EXPERTS, "qwen2_moe": GATED_EXPERTS, "dense": NO_MOE,
        "upcycled_shared": NO_MOE,  # its experts are adapted by their own deltas
        "upcycled_encoder": ["intermediate.experts.down_proj", "intermediate.experts.up_proj"], "dense_opt": NO_MOE,
    },
    "dense_mlp": {
        "upcycled": _each([1], "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "mixtral": NO_MOE,
        "upcycled_shared": _each([1], "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        "qwen2_moe": _each([1], "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),  # not the shared expert
        "dense": _each(range(3), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        "upcycled_encoder": _each([1], "intermediate.dense", "output.dense"), "dense_opt": _each(range(3), "fc1", "fc2"),
    },
    "router": {
        "upcycled": ["mlp.gate"], "mixtral": ["mlp.gate"], "qwen2_moe": ["mlp.gate"], "dense": NO_MOE,
        "upcycled_encoder": ["intermediate.gate"], "dense_opt": NO_MOE, "upcycled_shared": ["mlp.gate"],
    },
    "expert_deltas": {
        "upcycled_shared": ["mlp.experts.deltas"], "upcycled": NO_MOE, "mixtral": NO_MOE, "qwen2_moe": NO_MOE,
        "dense": NO_MOE, "upcycled_encoder": NO_MOE, "dense_opt": NO_MOE,
    },
}
SLOT = {"attention": 0, "dense_mlp": 0, "experts": 1, "router": 2, "expert_deltas": 2}


def test_every_group_is_expected_on_every_model():
    assert set(EXPECTED) == set(LORA_TARGET_GROUPS) == set(SLOT)


@pytest.mark.parametrize("group", sorted(EXPECTED))
@pytest.mark.parametrize("kind", sorted(EXPECTED["attention"]))
def test_each_group_finds_its_modules(models, group, kind):
    model, expected = models[kind](), EXPECTED[group][kind]
    if expected is NO_MOE:
        with pytest.raises(InvalidOptionError, match=rf"^lora_target '{group}' (needs a MoE model|matched no linear)"):
            find_targets(model, [group])
        return
    found = find_targets(model, [group])
    assert [len(names) > 0 for names in found] == [i == SLOT[group] for i in range(3)]
    names = found[SLOT[group]]
    assert (_in_layers(names) if SLOT[group] == 0 else names) == expected
    if SLOT[group] == 0:
        assert all(name in dict(model.named_modules()) for name in names)


@pytest.mark.parametrize("kind", ["upcycled", "upcycled_encoder", "mixtral", "qwen2_moe"])
def test_peft_trains_every_group_of_a_moe_model(models, kind):
    model = models[kind]()
    modules, parameters, save = find_targets(model, [g for g in LORA_TARGET_GROUPS if EXPECTED[g][kind] is not NO_MOE])
    with resolved_targets_kept():
        model = get_peft_model(model, LoraConfig(r=2, target_modules=modules, target_parameters=parameters,
                                                 modules_to_save=save))
    assert set(modules) <= {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".experts." in n and "lora_B" in n for n in grads)
    assert any(f"{save[0]}.modules_to_save.default.weight" in n for n in grads)
    assert any("lora_B" in n and n.split(".lora_B")[0].removeprefix("base_model.model.") in modules for n in grads)


def test_an_unknown_group_is_one_clear_error(models):
    with pytest.raises(InvalidOptionError) as info:
        find_targets(models["upcycled"](), ["attention", "expert"])
    message = str(info.value)
    assert message.startswith("lora_target 'expert' matches no module; did you mean 'experts'? groups are attention, "
                              "experts, dense_mlp, router, expert_deltas and linear module names are ")
    assert "\n" not in message and "q_proj" in message


# ------------------------------------------------------------------------------------------------ train
def test_train_with_a_list_of_groups(small_models, text, tmp_path, capsys):  # noqa: F811  (text is a fixture)
    _, moe = small_models
    run = tmp_path / "run"
    assert main(_train_argv(moe, text[0], run, "--use_lora", "--lora_target", "attention", "experts",
                            "--max_steps", "2")) == 0
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == GATED_EXPERTS
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert adapter["modules_to_save"] == ["mlp.gate"]  # --train_router (the default) adds the routers
    assert json.loads((run / "training_recipe.json").read_text())["moe"]["lora_target"] == ["attention", "experts"]
    _fails(capsys, _train_argv(moe, text[0], tmp_path / "typo", "--use_lora", "--lora_target", "attention", "expert"),
           "lora_target 'expert' matches no module; did you mean 'experts'?")
