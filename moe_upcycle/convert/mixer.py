"""Mix several models of one architecture into one MoE: each expert is one model's MLP (Branch-Train-MiX,
Sukhbaatar et al. 2024, arXiv 2403.07816; mergekit-moe's recipes), everything else from a base model or the float32
mean of the experts' models.

Streaming as ``convert``: the plan reads one tensor per source at a time (averages keep one float32 running sum);
router rows from prompts run the base model (or the first expert's) one prompt at a time and keep sums, not hidden
states. Every refusal happens before anything is written.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import tempfile
import time
from pathlib import Path

import torch

from ..adapters import get_adapter
from ..checkpoint import SafetensorsCheckpoint, check_output, read_config
from ..errors import InvalidOptionError
from ..hub import resolve_source
from ..version import __version__
from .converter import UpcycleResult, build_moe_config, write_moe
from .mix_recipe import ARCHITECTURES, GATE_MODES, MixRecipe, load_mix_recipe, parse_mix_recipe
from .options import UpcycleOptions, resolve_layers
from .plan import ExpertSource, PlanBuilder
from .router_data import rows_from_prompts

logger = logging.getLogger("moe_upcycle")

# Config fields that must agree for two checkpoints to be branches of one architecture (None when a family lacks one).
SAME_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act")


def _fields(config) -> dict[str, object]:
    """What must agree between two sources: the model type, the language model's shape fields and, for a
    vision-language model, its whole vision config."""
    text = config.get_text_config()
    fields = {"model_type": config.model_type, **{key: getattr(text, key, None) for key in SAME_FIELDS[1:]}}
    vision = getattr(config, "vision_config", None)
    return {**fields, "vision_config": vision.to_dict() if vision is not None else None}


def _refuse_mismatches(configs: dict[str, object]) -> None:
    (first, reference), *others = configs.items()
    reference = _fields(reference)
    for name, config in others:
        for key, b in _fields(config).items():
            a = reference[key]
            if a != b:
                shown = (f"{key}={b!r:.120} but {first} has {key}={a!r:.120}" if key != "vision_config"
                         else f"another vision_config than {first}")
                raise InvalidOptionError(f"{name} has {shown}; mix needs models of one architecture (branches of one "
                                         "seed model)")


def _refuse_other_vocabularies(folders: dict[str, Path]) -> None:
    """Compare the tokenizers' vocabularies (not their files) with the first one that loads."""
    from transformers import AutoTokenizer

    reference = None
    for name, folder in folders.items():
        try:
            vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
        except (OSError, ValueError):  # no tokenizer in this source: its vocabulary size was compared already
            continue
        if reference is None:
            reference = (name, vocab)
        elif vocab != reference[1]:
            raise InvalidOptionError(f"the tokenizer of {name} differs from that of {reference[0]} "
                                     f"({_first_difference({name: vocab, reference[0]: reference[1]})}); experts must "
                                     "share one vocabulary, token for token")


def _first_difference(vocabularies: dict[str, dict[str, int]]) -> str:
    """The first token id on which two vocabularies (source name -> token -> id) disagree, in words."""
    (a, first), (b, second) = ((name, {i: t for t, i in vocab.items()}) for name, vocab in vocabularies.items())
    for index in sorted(first.keys() | second.keys()):
        if first.get(index) != second.get(index):
            return f"token id {index} is {first.get(index)!r} in {a} but {second.get(index)!r} in {b}"
    return "the same tokens under other ids"


def _fingerprint(reader: SafetensorsCheckpoint, keys: dict[str, str], names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(reader.get(keys[name]).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _same_mlps(builder: PlanBuilder, readers: dict[str, SafetensorsCheckpoint], index: dict[str, int],
               names: list[str]) -> bool:
    """Whether the models ``names`` hold the same MLP weights in every MoE layer. Hashes one layer's MLP tensors at a
    time and stops at the first layer where they differ (branches trained with lower layers frozen differ late)."""
    if len(names) == 1:
        return True
    for layer in builder.layers:
        mlp = sorted(builder.mlp_tensors(layer))
        if len({_fingerprint(readers[n], builder.source_keys[index[n]], mlp) for n in names}) > 1:
            return False
    return True


def _options(recipe: MixRecipe, verify: bool, overwrite: bool) -> UpcycleOptions:
    router_init = GATE_MODES[recipe.gate_mode]
    try:
        options = UpcycleOptions(
            num_experts=recipe.num_experts, top_k=recipe.experts_per_token, layers=recipe.layers,
            router_type=recipe.router_type, router_init="random" if router_init in ("hidden", "embedding") else router_init,
            router_aux_loss_coef=recipe.router_aux_loss_coef, dtype=recipe.dtype, seed=recipe.seed, verify=verify,
            overwrite=overwrite)
    except TypeError as err:
        raise InvalidOptionError(str(err)) from None
    options.router_init = router_init  # prompts come from the recipe, not from a router_prompts file
    return options


def mix(recipe: str | Path | dict | MixRecipe, output: str | Path, *, verify: bool = False, overwrite: bool = False,
        allow_identical_sources: bool = False) -> UpcycleResult:
    """Build the MoE model that ``recipe`` describes (a mergekit-moe style YAML file, its parsed dict, or a
    :class:`MixRecipe`) in ``output``; with ``architecture`` set, the native class it names is written instead.

    ``verify`` runs the model on a fixed batch: when every expert and non-expert tensor comes from one model the
    logits must equal that model's (exact), otherwise they must be finite. Raises UpcycleError subclasses on bad input.
    """
    start = time.perf_counter()
    if isinstance(recipe, (str, Path)):
        recipe = load_mix_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_mix_recipe(recipe)
    output = Path(output)
    inputs = [p for p in (recipe.path, *recipe.sources()) if p is not None and Path(p).exists()]
    check_output(output, overwrite, inputs)
    options = _options(recipe, verify, overwrite)

    folders = {name: resolve_source(name) for name in recipe.sources()}
    inputs += list(folders.values())
    configs = {name: read_config(folder) for name, folder in folders.items()}
    _refuse_mismatches(configs)
    _refuse_other_vocabularies(folders)
    names = list(folders)
    base = recipe.base_model or recipe.experts[0].source_model
    dense_config, folder = configs[base], folders[base]
    adapter = get_adapter(dense_config)
    layers = resolve_layers(options.layers, dense_config.get_text_config().num_hidden_layers)
    readers = {name: SafetensorsCheckpoint(folders[name]) for name in names}
    order = [base, *(n for n in names if n != base)]
    index = {name: i for i, name in enumerate(order)}
    experts = [ExpertSource(index[e.source_model], e.noise_scale, e.residual_scale)
               for e in recipe.experts for _ in range(e.copies)]
    shared = recipe.shared_experts[0] if recipe.shared_experts else None
    builder = PlanBuilder(readers[base], adapter, dense_config, layers, options,
                          others=[readers[n] for n in order[1:]], experts=experts, nonexpert=recipe.nonexpert,
                          shared=ExpertSource(index[shared.source_model], shared.noise_scale, shared.residual_scale)
                          if shared else None)

    expert_models = list(dict.fromkeys(e.source_model for e in recipe.experts))
    if not (recipe.allow_identical_sources or allow_identical_sources) and _same_mlps(builder, readers, index, expert_models):
        raise InvalidOptionError(f"every expert has the same MLP weights ({' = '.join(expert_models)}): the mixture "
                                 "computes what that one model does and its experts cannot specialise; upcycle it with "
                                 "`moe-upcycle convert` instead (or pass --allow-identical-sources / set "
                                 "allow_identical_sources: true, e.g. to test the mixer)")
    if options.router_init in ("hidden", "embedding"):
        prompts = [e.prompts for e in recipe.experts for _ in range(e.copies)]
        builder.router_rows = rows_from_prompts(folder, adapter, dense_config, layers, readers[base], builder.keys,
                                                options, prompts)
    plan = builder.build()

    dtype = options.torch_dtype or next(t.dtype for t in plan if ".experts." in t.name)
    one_model = len(folders) == 1 and shared is None and all(e.noise_scale == 0 and e.residual_scale == 1
                                                             for e in recipe.experts)
    reasons = [] if one_model else [f"the experts and other weights come from {len(folders)} models, so the mixture "
                                    "reproduces none of them"]
    recipe_record = {
        "method": "mix", "source": base, "sources": names, "nonexpert": recipe.nonexpert, "gate_mode": recipe.gate_mode,
        "experts": [{"source_model": e.source_model, "copies": e.copies, "noise_scale": e.noise_scale,
                     "residual_scale": e.residual_scale} for e in recipe.experts],
        "shared_expert": shared.source_model if shared else None,
        "moe_upcycle_version": __version__, **options.recipe(), "inexact_reasons": reasons,
        "reproduce": shlex.join(["moe-upcycle", "mix", str(recipe.path or "RECIPE.yaml"), "OUTPUT"]),
    }
    moe_config = build_moe_config(dense_config, adapter, options, builder, layers, recipe_record, dtype)
    if recipe.architecture is None:
        result = write_moe(output, inputs, plan, moe_config, adapter, options, folder, list(readers.values()), reasons,
                           dtype, desc="Mixing")
    else:
        result = _write_native(output, inputs, plan, moe_config, adapter, options, folder, readers, reasons, dtype,
                               ARCHITECTURES[recipe.architecture])
    result.seconds = time.perf_counter() - start
    return result


def _write_native(output, inputs, plan, moe_config, adapter, options, folder, readers, reasons, dtype, target):
    """Mix into a temporary upcycled checkpoint, then export it to ``output`` as ``target`` (``architecture``); the
    files are those of ``mix`` followed by ``moe-upcycle export --to target``."""
    from ..export import export_native

    overwrite, options.overwrite = options.overwrite, False
    with tempfile.TemporaryDirectory(prefix="moe-upcycle-mix-") as staging:
        staged = Path(staging) / "upcycled"
        result = write_moe(staged, inputs, plan, moe_config, adapter, options, folder, list(readers.values()), reasons,
                           dtype, desc="Mixing")
        exported = export_native(staged, output, to=target, overwrite=overwrite, max_shard_size=options.max_shard_size)
    result.output, result.shards = exported.output, exported.shards
    result.notes += [f"exported as {exported.architecture}", *exported.notes]
    return result
