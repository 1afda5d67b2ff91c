"""``moe-upcycle mix`` (issue 13) on small llama, qwen2 and gpt2 checkpoints built here: exactness (identical sources
compute the source; forced routing computes the base with one branch's MLP; averaged non-expert tensors; expert tensors
bit for bit; residual_scale, copies and noise_scale), loading with and without the package, training, export to
Mixtral, a mergekit-moe recipe as mergekit documents it, and every refusal through the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_upcycle.cli import main
from moe_upcycle.convert import mix
from moe_upcycle.convert.verify import fixed_batch
from moe_upcycle.modeling.modeling_upcycled_moe import DENSE_PREFIX
from moe_upcycle.modeling.routers import Router

from .families import build_branch, build_dense
from .hostile import error_line, failure_problems, run_inprocess, snapshot, success_problems, tree_problems
from .test_errors_train import _train_argv
from .test_remote_code import assert_same_logits_without_package

FAMILIES = ("llama", "qwen2", "gpt2")
VOCAB = 320  # the byte-level BPE tokenizer below: 256 bytes, a special token and 63 merges
TOL = 1e-5
SMALL = {"llama": {"num_hidden_layers": 2}, "qwen2": {"num_hidden_layers": 2},
         "gpt2": {"n_layer": 2, "bos_token_id": 0, "eos_token_id": 0}}
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}
DOWN = {"llama": ("down_proj.",), "qwen2": ("down_proj.",), "gpt2": ("c_proj.",)}  # what residual_scale multiplies
_GATED = {"gate_up_proj": lambda m: torch.cat([m["gate_proj.weight"], m["up_proj.weight"]]),
          "down_proj": lambda m: m["down_proj.weight"]}
# Each fused expert tensor of the output, made from one source layer's MLP tensors (named inside the MLP module).
EXPERT_TENSORS = {"llama": _GATED, "qwen2": _GATED,
                  "gpt2": {"up_proj": lambda m: m["c_fc.weight"].t(), "up_proj_bias": lambda m: m["c_fc.bias"],
                           "down_proj": lambda m: m["c_proj.weight"].t(), "down_proj_bias": lambda m: m["c_proj.bias"]}}


# ----------------------------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    """Two byte-level BPE tokenizers of VOCAB tokens each, trained on different prose: same size, other tokens."""
    from moe_upcycle.demo import documentation_text, train_tokenizer

    text, root = documentation_text(), tmp_path_factory.mktemp("tokenizers")
    folders = root / "a", root / "b"
    for folder, part in zip(folders, (text[:20000], text[20000:40000]), strict=True):
        tokenizer = train_tokenizer(part, vocab_size=VOCAB)
        assert len(tokenizer) == VOCAB
        tokenizer.save_pretrained(folder)
    return folders


def _with_tokenizer(folder: Path, tokenizer: Path) -> Path:
    for file in tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizers) -> dict[str, list[Path]]:
    """Per family: a base checkpoint and three branches of it, each with the same tokenizer."""
    root = tmp_path_factory.mktemp("mix-sources")
    made = {}
    for family in FAMILIES:
        base = build_dense(family, root / family / "base", vocab_size=VOCAB, **SMALL[family])
        _with_tokenizer(base, tokenizers[0])
        made[family] = [base, *(build_branch(base, root / family / f"branch{j}", seed=1 + j) for j in range(3))]
    return made


# ------------------------------------------------------------------------------------------------ helpers
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for shard in sorted(folder.glob("*.safetensors")) for name, t in load_file(shard).items()}


def _mlp(tensors: dict[str, torch.Tensor], family: str, layer: int) -> dict[str, torch.Tensor]:
    prefix = f"{LAYERS[family]}.{layer}.mlp."
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    """Logits of the real tokens of a fixed batch whose second row is left-padded: [N, V]."""
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=2, seq_len=12)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[attention_mask.bool()]


@torch.no_grad()
def _greedy(model) -> torch.Tensor:
    input_ids, attention_mask = fixed_batch(VOCAB, batch_size=2, seq_len=12)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                          pad_token_id=0)


def _route_all_to(model, expert: int) -> None:
    """Every router sends every token to ``expert`` alone: its logit dominates (the recipe asked for top-1)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert routers
    for router in routers:
        assert router.top_k == 1
        router.logits = lambda h, n=router.num_experts: F.one_hot(torch.full(h.shape[:-1], expert), n).float() * 30


def _dense_with_mlp(base: Path, source: Path, family: str, scale: float = 1.0):
    """The dense ``base`` with every MLP replaced by ``source``'s, its down projection multiplied by ``scale``."""
    model, donor = _load(base), _load(source).state_dict()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                down = name.split(".mlp.")[1].startswith(DOWN[family])
                parameter.copy_(donor[name] * (scale if down else 1.0))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _recipe(*experts, **keys) -> dict:
    return {"gate_mode": "random", "dtype": "float32", **keys,
            "experts": [e if isinstance(e, dict) else {"source_model": str(e)} for e in experts]}


def _write(path: Path, recipe: dict | str) -> Path:
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("nonexpert", ["base", "average"])
@pytest.mark.parametrize("family", FAMILIES)
def test_identical_sources_compute_the_source(family, nonexpert, sources, tmp_path):
    """(a) The same folder for every expert: the logits equal the source's (left-padded row included), and so do the
    greedy generations."""
    source = sources[family][0]
    keys = {"base_model": str(source)} if nonexpert == "base" else {}
    result = mix(_recipe(source, source, source, experts_per_token=2, nonexpert=nonexpert, **keys), tmp_path / "moe",
                 verify=True, allow_identical_sources=True)
    assert result.max_logit_diff <= TOL
    dense, moe = _load(source), _load(tmp_path / "moe")
    assert type(moe).__name__ == "UpcycledMoeForCausalLM" and moe.config.num_experts == 3
    assert _max_diff(_logits(dense), _logits(moe)) <= TOL
    assert torch.equal(_greedy(dense), _greedy(moe))


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_routing_computes_the_base_with_one_branchs_mlp(family, sources, tmp_path):
    """(b) Branches that differ everywhere, ``nonexpert: base``: with every token sent to expert j alone, the mixture
    is the base model with branch j's MLPs."""
    base, *branches = sources[family]
    mix(_recipe(*branches, base_model=str(base), nonexpert="base", experts_per_token=1), tmp_path / "moe")
    moe = _load(tmp_path / "moe")
    outputs = []
    for j, branch in enumerate(branches):
        _route_all_to(moe, j)
        outputs.append(_logits(moe))
        assert _max_diff(outputs[-1], _logits(_dense_with_mlp(base, branch, family))) <= TOL, j
    assert _max_diff(outputs[0], outputs[1]) > 1e-2  # the branches' MLPs do differ


@pytest.mark.parametrize(("family", "dtype"), [(f, "float32") for f in FAMILIES] + [("llama", "bfloat16")])
def test_average_is_the_float32_mean_and_experts_are_the_branches_mlps(family, dtype, sources, tmp_path):
    """(c) ``nonexpert: average`` (the default without base_model): every non-expert tensor is the float32 mean of the
    sources cast to the output dtype; expert j's tensors are branch j's MLP, bit for bit (cast likewise)."""
    _, *branches = sources[family]
    mix(_recipe(*branches, dtype=dtype, experts_per_token=2), tmp_path / "moe")
    out, inputs = _tensors(tmp_path / "moe"), [_tensors(b) for b in branches]
    torch_dtype = getattr(torch, dtype)
    nonexpert = [name for name in inputs[0] if ".mlp." not in name]
    for name in nonexpert:
        mean = (sum(t[name].float() for t in inputs) / len(inputs)).to(torch_dtype)
        assert torch.equal(out[DENSE_PREFIX + name], mean), name
    experts = []
    for layer in range(2):
        sources_mlp = [_mlp(t, family, layer) for t in inputs]
        for tensor, make in EXPERT_TENSORS[family].items():
            experts.append(f"{DENSE_PREFIX}{LAYERS[family]}.{layer}.mlp.experts.{tensor}")
            fused = out[experts[-1]]
            assert fused.shape[0] == 3 and fused.dtype == torch_dtype
            for j, mlp in enumerate(sources_mlp):
                assert torch.equal(fused[j], make(mlp).to(torch_dtype)), (experts[-1], j)
    routers = {n for n in out if n.endswith(".mlp.gate.weight")}
    assert set(out) == {DENSE_PREFIX + n for n in nonexpert} | set(experts) | routers and len(routers) == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_residual_scale_copies_and_noise_scale(family, sources, tmp_path):
    """(d) residual_scale multiplies the expert's down projection (and its bias); copies repeat an expert; noise_scale
    adds absolute Gaussian noise of that std to every tensor of the expert, different for each copy."""
    base, *branches = sources[family]
    recipe = _recipe({"source_model": str(branches[0]), "residual_scale": 0.5},
                     {"source_model": str(branches[1]), "copies": 2},
                     {"source_model": str(branches[2]), "copies": 2, "noise_scale": 0.01},
                     base_model=str(base), experts_per_token=1)
    mix(recipe, tmp_path / "moe")
    out, inputs = _tensors(tmp_path / "moe"), [_tensors(b) for b in branches]
    for layer in range(2):
        noise = {3: [], 4: []}
        for tensor, make in EXPERT_TENSORS[family].items():
            fused = out[f"{DENSE_PREFIX}{LAYERS[family]}.{layer}.mlp.experts.{tensor}"]
            expected = [make(_mlp(t, family, layer)) for t in inputs]
            assert fused.shape[0] == 5
            assert torch.equal(fused[0], expected[0] * (0.5 if tensor.startswith("down_proj") else 1.0)), tensor
            assert torch.equal(fused[1], expected[1]) and torch.equal(fused[2], expected[1]), tensor
            for copy in (3, 4):
                noise[copy].append((fused[copy] - expected[2]).flatten())
        for copy, parts in noise.items():
            added = torch.cat(parts)
            assert abs(added.std().item() - 0.01) < 0.001 and abs(added.mean().item()) < 0.001, (layer, copy)
        assert not torch.equal(torch.cat(noise[3]), torch.cat(noise[4]))
    moe = _load(tmp_path / "moe")
    for expert, source, scale in ((0, branches[0], 0.5), (2, branches[1], 1.0)):
        _route_all_to(moe, expert)
        assert _max_diff(_logits(moe), _logits(_dense_with_mlp(base, source, family, scale))) <= TOL, expert


def test_branches_that_differ_only_in_a_late_layer_are_not_identical(sources, tmp_path):
    """Branches trained with their lower layers frozen: the same layer-0 MLP, another layer-1 MLP. Not refused."""
    base = sources["llama"][0]
    late = tmp_path / "late"
    shutil.copytree(base, late)
    model = _load(base)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(2)
    model.save_pretrained(late, max_shard_size="30KB")
    mix(_recipe(base, late, experts_per_token=1), tmp_path / "moe")
    fused = _tensors(tmp_path / "moe")[f"{DENSE_PREFIX}model.layers.1.mlp.experts.down_proj"]
    assert torch.equal(fused[1], fused[0] * 2)


# ------------------------------------------------------------------------------------- load, train, export
def test_mixed_models_load_with_and_without_the_package(sources, tmp_path):
    """``from_pretrained`` with the package, and ``trust_remote_code=True`` in a process that cannot import it."""
    folders = {family: tmp_path / family for family in FAMILIES}
    for family, out in folders.items():
        mix(_recipe(*sources[family][1:], experts_per_token=2), out)
    assert_same_logits_without_package(folders, VOCAB, tmp_path)


@pytest.fixture(scope="module")
def mixed_llama(sources, tmp_path_factory) -> Path:
    base, *branches = sources["llama"]
    out = tmp_path_factory.mktemp("mixed") / "moe"
    mix(_recipe(*branches, experts_per_token=2), out)
    return out


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_mixed_model_trains(lora, mixed_llama, docs_files, tmp_path):
    train, valid = docs_files
    argv = _train_argv(mixed_llama, train, tmp_path / "run", "--max_steps", "2", "--max_train_samples", "8",
                       *(["--use_lora"] if lora else []), valid=valid)
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    if lora:
        assert (tmp_path / "run" / "adapter_config.json").is_file()
    else:
        trained = _load(tmp_path / "run")
        assert type(trained).__name__ == "UpcycledMoeForCausalLM" and trained.config.num_experts == 3


def test_export_to_mixtral_and_architecture_mixtral(mixed_llama, sources, tmp_path):
    """``export --to mixtral`` computes our logits; ``architecture: mixtral`` in the recipe writes the files of mix +
    export: the same names and bytes (config.json included), but for the marker, which holds the writer's process id."""
    _, *branches = sources["llama"]
    assert main(["export", str(mixed_llama), str(tmp_path / "exported"), "--to", "mixtral"]) == 0
    ours, native = _load(mixed_llama), _load(tmp_path / "exported")
    assert type(native).__name__ == "MixtralForCausalLM"
    assert _max_diff(_logits(ours), _logits(native)) <= TOL
    recipe = _write(tmp_path / "native.yaml", _recipe(*branches, experts_per_token=2, architecture="mixtral"))
    assert main(["mix", str(recipe), str(tmp_path / "direct")]) == 0
    exported, direct = ({p.name: p for p in (tmp_path / d).iterdir()} for d in ("exported", "direct"))
    assert set(exported) == set(direct) and "tokenizer.json" in direct
    differ = sorted(name for name in exported if exported[name].read_bytes() != direct[name].read_bytes())
    assert differ in ([], [".moe-upcycle"]), differ
    assert _tensors(tmp_path / "direct").keys() == _tensors(tmp_path / "exported").keys()


MERGEKIT_RECIPE = """\
base_model: {base}
gate_mode: hidden # one of "hidden", "cheap_embed", or "random"
dtype: bfloat16 # output dtype (float32, float16, or bfloat16)
## (optional)
experts_per_token: 2
experts:
  - source_model: {base}
    positive_prompts:
      - "<|im_start|>user\\nHello, who are you?<|im_end|>"
      - "<|im_start|>user\\nI need help with"
  - source_model: {branch0}
    positive_prompts:
      - "As a doctor of medicine,"
    ## (optional)
    negative_prompts:
      - "> get ye flask"
  - source_model: {branch1}
    positive_prompts:
      - "[Genres: Science Fiction]\\n[Tags: humor, old school, sci fi]"
      - "> get ye flask"
      - "[Mode: Interactive Storyteller]"
"""


def test_a_mergekit_recipe_runs_unchanged(sources, tmp_path, capfd):
    """mergekit-moe's documented form (docs/moe.md, its "clown car" example with negative prompts and
    experts_per_token), Hub ids replaced by local folders, through the command line."""
    base, *branches = sources["llama"]
    recipe = _write(tmp_path / "config.yml", MERGEKIT_RECIPE.format(base=base, branch0=branches[0], branch1=branches[1]))
    outcome = run_inprocess(["mix", recipe, tmp_path / "clown-car"], capfd)
    assert not success_problems(outcome), outcome.describe()
    moe = _load(tmp_path / "clown-car")
    config = json.loads((tmp_path / "clown-car" / "config.json").read_text())
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 2 and config["dtype"] == "bfloat16"
    assert config["upcycling"]["gate_mode"] == "hidden"
    rows = _tensors(tmp_path / "clown-car")[f"{DENSE_PREFIX}model.layers.0.mlp.gate.weight"].float()
    assert torch.isfinite(rows).all() and _max_diff(rows[0], rows[1]) > 0 and _max_diff(rows[1], rows[2]) > 0
    assert torch.isfinite(_logits(moe)).all()


# ------------------------------------------------------------------------------------------------ refusals
def _refused(tmp_path: Path, argv: list, capfd, *needles: str) -> str:
    """The command exits with 2 and one error line holding ``needles``; nothing under ``tmp_path`` changed."""
    before = snapshot(tmp_path)
    outcome = run_inprocess(argv, capfd)
    assert not failure_problems(outcome) and outcome.code == 2, outcome.describe()
    line = error_line(outcome)
    for needle in needles:
        assert needle in line, (needle, line)
    assert not tree_problems(tmp_path, before, snapshot(tmp_path))
    return line


MISMATCHES = [  # (case, second source: family and config overrides, what the error line names)
    ("model_type", ("mistral", {}), ["model_type='mistral'", "model_type='llama'"]),
    ("hidden_size", ("llama", {"hidden_size": 64}), ["hidden_size=64", "hidden_size=32"]),
    ("intermediate_size", ("llama", {"intermediate_size": 64}), ["intermediate_size=64", "intermediate_size=48"]),
    ("layer_count", ("llama", {"num_hidden_layers": 3}), ["num_hidden_layers=3", "num_hidden_layers=2"]),
    ("head_layout", ("llama", {"num_key_value_heads": 4}), ["num_key_value_heads=4", "num_key_value_heads=2"]),
    ("vocab_size", ("llama", {"vocab_size": VOCAB + 32}), [f"vocab_size={VOCAB + 32}", f"vocab_size={VOCAB}"]),
    ("tie_word_embeddings", ("llama", {"tie_word_embeddings": False}),
     ["tie_word_embeddings=False", "tie_word_embeddings=True"]),
    ("gpt2_intermediate_size", ("gpt2", {"n_inner": 64}), ["64", "128"]),
]


@pytest.mark.parametrize(("case", "other", "needles"), MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_sources_of_another_architecture_are_refused(case, other, needles, tmp_path, capfd):
    family = "gpt2" if other[0] == "gpt2" else "llama"
    base = build_dense(family, tmp_path / "base", vocab_size=VOCAB, **SMALL[family])
    kind, overrides = other
    odd = build_dense(kind, tmp_path / "odd", seed=1, **{"vocab_size": VOCAB, **SMALL.get(kind, SMALL["llama"]), **overrides})
    recipe = _write(tmp_path / "mix.yaml", _recipe(base, odd, base_model=str(base)))
    _refused(tmp_path, ["mix", recipe, tmp_path / "out"], capfd, str(base), str(odd), *needles)


def test_a_tokenizer_with_other_tokens_is_refused(sources, tokenizers, tmp_path, capfd):
    base, branch, *_ = sources["llama"]
    other = _with_tokenizer(shutil.copytree(branch, tmp_path / "other"), tokenizers[1])
    recipe = _write(tmp_path / "mix.yaml", _recipe(base, other, base_model=str(base)))
    _refused(tmp_path, ["mix", recipe, tmp_path / "out"], capfd, f"tokenizer of {other}", str(base))


def test_identical_sources_are_refused_unless_allowed(sources, tmp_path, capfd):
    base = sources["llama"][0]
    twin = shutil.copytree(base, tmp_path / "twin")
    recipe = _write(tmp_path / "mix.yaml", _recipe(base, twin))
    argv = ["mix", recipe, tmp_path / "out"]
    _refused(tmp_path, argv, capfd, "same MLP weights", str(base), str(twin), "--allow-identical-sources")
    before = snapshot(tmp_path)
    outcome = run_inprocess([*argv, "--allow-identical-sources", "--verify"], capfd)
    assert not success_problems(outcome), outcome.describe()
    assert not tree_problems(tmp_path, before, snapshot(tmp_path), fresh=tmp_path / "out")
    assert "max |logit diff|" in outcome.out


BAD_RECIPES = [  # (case, recipe edit on {base, branch}, what the error line names)
    ("prompts_with_random_gate", lambda b, s: _recipe({"source_model": b, "positive_prompts": ["def f():"]}, s),
     ["gate_mode='random'", "positive_prompts", "experts [0]"]),
    ("fewer_experts_than_top_k", lambda b, s: _recipe(b, s, experts_per_token=3), ["experts_per_token=3", "2 expert(s)"]),
    ("hidden_without_prompts", lambda b, s: _recipe(b, s, gate_mode="hidden"), ["gate_mode='hidden'", "experts [0, 1]"]),
    ("unknown_key", lambda b, s: _recipe(b, s, experts_per_tok=2), ["experts_per_tok"]),
    ("unknown_expert_key", lambda b, s: _recipe({"source_model": b, "weight": 0.5}, s), ["experts[0]", "'weight'"]),
    ("top_k_string", lambda b, s: _recipe(b, s, experts_per_token="two"), ["experts_per_token", "'two'"]),
    ("top_k_true", lambda b, s: _recipe(b, s, experts_per_token=True), ["experts_per_token", "True"]),
    ("experts_string", lambda b, s: {"experts": b}, ["experts must be a non-empty list"]),
    ("experts_empty", lambda b, s: {"experts": []}, ["experts must be a non-empty list"]),
    ("expert_not_a_mapping", lambda b, s: {"experts": [b, s]}, ["experts[0]", "must be a mapping"]),
    ("source_model_number", lambda b, s: _recipe({"source_model": 7}, s), ["source_model", "7"]),
    ("noise_scale_string", lambda b, s: _recipe({"source_model": b, "noise_scale": "lots"}, s), ["noise_scale", "'lots'"]),
    ("noise_scale_negative", lambda b, s: _recipe({"source_model": b, "noise_scale": -1}, s), ["noise_scale", "-1"]),
    ("residual_scale_list", lambda b, s: _recipe({"source_model": b, "residual_scale": [1]}, s), ["residual_scale", "[1]"]),
    ("copies_zero", lambda b, s: _recipe({"source_model": b, "copies": 0}, s), ["copies", "0"]),
    ("copies_float", lambda b, s: _recipe({"source_model": b, "copies": 1.5}, s), ["copies", "1.5"]),
    ("gate_mode_unknown", lambda b, s: _recipe(b, s, gate_mode="learned"), ["gate_mode='learned'", "hidden"]),
    ("gate_mode_list", lambda b, s: _recipe(b, s, gate_mode=["random"]), ["gate_mode=['random']"]),
    ("architecture_list", lambda b, s: _recipe(b, s, architecture=["mixtral"]), ["architecture=['mixtral']"]),
    ("noise_scale_false", lambda b, s: _recipe({"source_model": b, "noise_scale": False}, s), ["noise_scale", "False"]),
    ("shared_experts_false", lambda b, s: _recipe(b, s, shared_experts=False), ["shared_experts", "False"]),
    ("dtype_number", lambda b, s: _recipe(b, s, dtype=16), ["dtype", "16"]),
    ("dtype_unknown", lambda b, s: _recipe(b, s, dtype="int8"), ["int8"]),
    ("architecture_unknown", lambda b, s: _recipe(b, s, architecture="deepseek"), ["architecture='deepseek'", "mixtral"]),
    ("nonexpert_unknown", lambda b, s: _recipe(b, s, nonexpert="first"), ["nonexpert='first'", "average"]),
    ("nonexpert_base_without_base", lambda b, s: _recipe(b, s, nonexpert="base"), ["nonexpert: base", "base_model"]),
    ("two_shared_experts", lambda b, s: _recipe(b, s, shared_experts=[{"source_model": b}, {"source_model": s}]),
     ["shared_experts", "at most one"]),
    ("allow_identical_quoted", lambda b, s: _recipe(b, s, allow_identical_sources="yes"),
     ["allow_identical_sources", "'yes'"]),
    ("tokenizer_source_union", lambda b, s: _recipe(b, s, tokenizer_source="union"), ["tokenizer_source='union'"]),
    ("source_missing", lambda b, s: _recipe(b, str(Path(s).parent / "no-such-model")), ["no-such-model"]),
    ("document_a_list", lambda b, s: [b, s], ["must be a mapping", "list"]),
]


@pytest.mark.parametrize(("case", "make", "needles"), BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipes_are_refused(case, make, needles, sources, tmp_path, capfd):
    base, branch, *_ = sources["llama"]
    recipe = _write(tmp_path / "mix.yaml", make(str(base), str(branch)))
    _refused(tmp_path, ["mix", recipe, tmp_path / "out"], capfd, *needles)


@pytest.mark.parametrize(("case", "text", "needles"), [
    ("missing", None, ["does not exist"]),
    ("yaml_syntax", "experts: [{source_model: a}\ngate_mode: random\n", ["not valid YAML", "line"]),
    ("tab_indent", "gate_mode: random\n\texperts: []\n", ["not valid YAML"]),
    ("not_utf8", b"gate_mode: random\n\xff\xfe: 1\n", ["cannot read"]),
])
def test_unreadable_recipes_are_refused(case, text, needles, tmp_path, capfd):
    recipe = tmp_path / "mix.yaml"
    if isinstance(text, bytes):
        recipe.write_bytes(text)
    elif text is not None:
        recipe.write_text(text)
    _refused(tmp_path, ["mix", recipe, tmp_path / "out"], capfd, str(recipe), *needles)


def test_an_output_that_is_or_lies_inside_a_source_is_refused(sources, tmp_path, capfd):
    _, *branches = sources["llama"]
    work = tmp_path / "work"
    a, b = (shutil.copytree(branch, work / name) for name, branch in zip("ab", branches, strict=False))
    recipe = _write(work / "mix.yaml", _recipe(a, b))
    for output in (a, b):
        _refused(work, ["mix", recipe, output, "--overwrite"], capfd, str(output), "input")
        _refused(work, ["mix", recipe, output], capfd, str(output))
    assert main(["mix", str(recipe), str(work / "old")]) == 0
    shutil.move(work / "old", a / "old")  # an earlier output of ours, now inside a source
    _refused(work, ["mix", recipe, a / "old", "--overwrite"], capfd, "lies inside the input", str(a))
    _refused(work, ["mix", recipe, work, "--overwrite"], capfd, "contains the input")
    _refused(work, ["mix", recipe, recipe, "--overwrite"], capfd, str(recipe))


def test_the_tokenizer_refusal_names_the_first_differing_token():
    from moe_upcycle.convert.mixer import _first_difference

    assert _first_difference({"a": {"x": 0, "y": 1}, "b": {"x": 0, "z": 1}}) == "token id 1 is 'y' in a but 'z' in b"
    assert _first_difference({"a": {"x": 0}, "b": {"x": 0, "z": 1}}) == "token id 1 is None in a but 'z' in b"
