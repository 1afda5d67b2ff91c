"""``upcycle()``: stream a dense safetensors checkpoint into an ``UpcycledMoeForCausalLM`` checkpoint.

Sparse upcycling (Komatsuzaki et al. 2023, arXiv 2212.05055): each chosen layer's MLP is copied into E
experts and a new router picks k of them per token. With exact copies, a small random router and
renormalised top-k weights (which sum to 1) the MoE model computes exactly what the dense model did.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.dynamic_module_utils import custom_object_save

from ..adapters import get_adapter
from ..card import parameter_counts, source_license, write_card
from ..checkpoint import (
    PlannedTensor,
    SafetensorsCheckpoint,
    atomic_folder,
    check_output,
    check_planned,
    copy_side_files,
    raw_config,
    read_config,
    write_sharded,
)
from ..errors import InvalidOptionError, VerificationError
from ..hub import resolve_source
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.quantized_experts import scheme_summary
from ..version import __version__
from .options import UpcycleOptions, reproduce_flags, resolve_layers
from .plan import MOE_CLASSES, PlanBuilder, check_against_model
from .router_data import rows_from_prompts
from .verify import Comparison, verify_conversion

logger = logging.getLogger("moe_upcycle")

ENCODER_AUTO_MAP = {
    f"AutoModel{head}": f"modeling_upcycled_moe.UpcycledMoe{head or 'Model'}"
    for head in ("", "ForMaskedLM", "ForSequenceClassification")
}
EXACT_TOLERANCE = 1e-4  # float32 logits; measured differences are ~1e-7


@dataclass
class UpcycleResult:
    """What a conversion produced."""

    output: Path
    moe_layers: list[int]
    shards: list[str]
    total_params: int
    active_params: int
    bytes_written: int
    seconds: float
    max_logit_diff: float | None = None
    notes: list[str] = field(default_factory=list)


def _lossless_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """Every value of ``source`` is a value of ``target`` (e.g. bfloat16 or float16 into float32)."""
    return source == target or (target in (torch.float32, torch.float64) and source.itemsize < target.itemsize)


def judge(comparison: Comparison, reasons: list[str], dtype: torch.dtype) -> str:
    """The verification verdict as one line; raises :class:`VerificationError` when the conversion is broken.

    Non-finite outputs always fail: a NaN difference must never read as "within tolerance".
    """
    if not comparison.dense_finite:
        raise VerificationError("the dense source's own outputs are not finite (NaN or inf in its weights?); "
                                "check the source checkpoint before upcycling it")
    if not comparison.moe_finite:
        name = str(dtype).removeprefix("torch.")
        hint = (f"{name} cannot hold the scaled experts: pass --dtype bfloat16 or float32" if dtype == torch.float16
                else "please report this with the source model")
        raise VerificationError(f"the upcycled model's outputs are not finite (NaN or inf) although the dense model's "
                                f"are; {hint}")
    if reasons:
        return f"max |logit diff| {comparison.max_diff:.3g} (not expected to be exact: {'; '.join(reasons)})"
    if not comparison.max_diff <= EXACT_TOLERANCE:
        raise VerificationError(
            f"the upcycled model's outputs differ from the dense model's by {comparison.max_diff:.3g} "
            f"(> {EXACT_TOLERANCE}) although the recipe is exact; please report this with the source model"
        )
    return f"max |logit diff| {comparison.max_diff:.3g}: the MoE model computes what the dense model did"


# Files of a Transformers processor that turns images into model inputs (the image processor's settings).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def has_processor(folder: Path) -> bool:
    """Whether ``folder`` holds a saved image processor (a vision-language source's, copied to the output)."""
    for name in PROCESSOR_FILES:
        try:
            raw = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and (name == PROCESSOR_FILES[0] or "image_processor" in raw):
            return True
    return False


def _load_dense_config(folder: Path):
    return read_config(folder)


def upcycle(source: str | Path, output: str | Path, options: UpcycleOptions | None = None, **kwargs) -> UpcycleResult:
    """Convert the dense causal LM ``source`` (local folder or Hub id) into a sparse MoE model in ``output``.

    Options are an :class:`UpcycleOptions` or its fields as keyword arguments, e.g.
    ``upcycle("Qwen/Qwen2.5-0.5B", "out", num_experts=8, top_k=2, layers="every:2")``.
    Nothing is written unless the whole conversion (and ``verify``, if asked) succeeds; the output then
    appears at once. Raises :class:`moe_upcycle.errors.UpcycleError` subclasses on bad input.
    """
    if options is None:
        try:
            options = UpcycleOptions(**kwargs)
        except TypeError as err:
            raise InvalidOptionError(str(err)) from None
    elif kwargs:
        raise InvalidOptionError("pass either an UpcycleOptions object or keyword options, not both")

    start = time.perf_counter()
    output = Path(output)
    inputs = [p for p in (str(source), options.router_prompts) if p is not None and Path(p).exists()]
    check_output(output, options.overwrite, inputs)
    folder = resolve_source(str(source), options.revision)
    inputs.append(folder)
    dense_config = _load_dense_config(folder)
    adapter = get_adapter(dense_config)
    layers = resolve_layers(options.layers, dense_config.get_text_config().num_hidden_layers)
    reader = SafetensorsCheckpoint(folder)
    builder = PlanBuilder(reader, adapter, dense_config, layers, options)
    if options.router_init in ("hidden", "embedding"):
        builder.router_rows = rows_from_prompts(folder, adapter, dense_config, layers, reader, builder.keys, options)
    plan = builder.build()

    dtype = options.torch_dtype or next(t.dtype for t in plan if ".experts." in t.name)
    notes = [] if adapter.task != "image_text_to_text" or has_processor(folder) else [
        f"note: {source} has no image processor files ({', '.join(PROCESSOR_FILES)}): the output cannot be used with "
        "images until you add the source's processor files to it (AutoProcessor.from_pretrained(OUTPUT) must load)"]
    overflow = builder.overflowing_layers()
    if overflow:
        name = str(dtype).removeprefix("torch.")
        notes.append(f"warning: the scaled experts of layer(s) {overflow} exceed the largest {name} value and will be "
                     "inf/NaN; pass --dtype bfloat16 or float32")
        logger.warning(notes[-1])
    reasons = options.inexact_reasons()
    source_dtypes = sorted({str(info.dtype).removeprefix("torch.") for info in reader.info.values()
                            if info.dtype.is_floating_point and not _lossless_cast(info.dtype, dtype)})
    if options.torch_dtype is not None and source_dtypes:
        reasons.append(f"the weights were cast from {', '.join(source_dtypes)} to {options.dtype}")
    if overflow:
        reasons.append(f"the scaled experts of layer(s) {overflow} overflow {options.dtype if options.torch_dtype else dtype}")
    recipe = {"method": "sparse_upcycling", "source": str(source), "revision": options.revision,
              "license": source_license(folder), "moe_upcycle_version": __version__, **options.recipe(),
              "inexact_reasons": reasons}
    recipe["reproduce"] = shlex.join(["moe-upcycle", "convert", str(source), "OUTPUT", *reproduce_flags(recipe)])
    moe_config = build_moe_config(dense_config, adapter, options, builder, layers, recipe, dtype)
    result = write_moe(output, inputs, plan, moe_config, adapter, options, folder, [reader], reasons, dtype,
                       desc="Upcycling")
    result.notes[:0] = notes
    result.seconds = time.perf_counter() - start
    return result


def build_moe_config(dense_config, adapter, options: UpcycleOptions, builder: PlanBuilder, layers: list[int],
                     recipe: dict, dtype: torch.dtype) -> UpcycledMoeConfig:
    """The upcycled config of a planned conversion (or mix); an invalid combination is one InvalidOptionError."""
    try:
        moe_config = UpcycledMoeConfig(
            text_config=dense_config,
            num_experts=options.num_experts,
            num_experts_per_tok=options.top_k,
            moe_layers=layers,
            expert_intermediate_size=builder.expert_intermediate_size(),
            router_aux_loss_coef=options.router_aux_loss_coef,
            router_z_loss_coef=options.router_z_loss_coef,
            router_jitter_noise=options.router_jitter_noise,
            router_init_std=options.router_init_std,
            router_type=options.router_type,
            router_bias_update_rate=options.router_bias_update_rate,
            shared_expert_intermediate_size=builder.shared_width(),
            shared_expert_gate=options.shared_expert_gate,
            expert_sharing=options.expert_sharing,
            expert_lora_rank=options.expert_lora_rank if options.lora_targets else 0,
            expert_lora_alpha=float(options.expert_lora_alpha or 0.0) if options.lora_targets else 0.0,
            expert_lora_targets=options.lora_targets or None,
            upcycling=recipe,
            **adapter.moe_config_fields(dense_config),
        )
    except ValueError as err:
        raise InvalidOptionError(str(err)) from None
    moe_config.dtype = dtype
    moe_config.text_config.dtype = dtype
    return moe_config


def checkpoint_task(config: UpcycledMoeConfig) -> str:
    """The task (``causal_lm``, ``encoder``, ``image_text_to_text``) of an upcycled checkpoint, from its dense config."""
    return get_adapter(config.text_config).task


def check_source_tensors(reader: SafetensorsCheckpoint, config: UpcycledMoeConfig, what: str) -> None:
    """Raise unless ``reader`` holds exactly the tensors, shapes included, of the model ``config`` describes (``what``
    names it): a checkpoint that a rewrite (quantize, materialize) would read as it is, checked before planning."""
    with torch.device("meta"):
        model = MOE_CLASSES[checkpoint_task(config)](config)
    found = [PlannedTensor(name, info.dtype, info.shape, list) for name, info in reader.info.items()]
    check_planned(found, model, what)


def read_float_experts(folder: Path, action: str) -> UpcycledMoeConfig:
    """The config of the upcycled checkpoint ``folder``, whose experts must be full float tensors (what ``shrink`` and
    ``quantize`` rewrite); anything else is refused in one line naming what ``action`` needs."""
    raw = raw_config(folder, "an upcycled checkpoint")
    if raw.get("model_type") != UpcycledMoeConfig.model_type:
        raise InvalidOptionError(f"{folder} is a {raw.get('model_type')!r} model, not an upcycled MoE one: {action} "
                                 "rewrites the experts of what moe-upcycle convert, mix or train wrote")
    quantization = raw.get("quantization_config")
    if quantization:
        method = (quantization.get("quant_method") if isinstance(quantization, dict)
                  else getattr(quantization, "quant_method", "a quantisation library"))
        raise InvalidOptionError(f"{folder} is already quantised (by {method}); {action} the float model it was "
                                 "quantised from")
    config = read_config(folder, UpcycledMoeConfig, "an upcycled checkpoint")
    if config.expert_sharing != "none":
        raise InvalidOptionError(f"{folder} has shared-weight experts; materialize them first (moe-upcycle materialize) "
                                 f"and {action} that folder")
    if config.expert_precision:
        raise InvalidOptionError(f"{folder} is already quantised ({scheme_summary(config.expert_precision)}); "
                                 f"{action} the float model it was quantised from")
    return config


@contextmanager
def upcycled_checkpoint(output: Path, plan: list[PlannedTensor], config: UpcycledMoeConfig, *, overwrite: bool,
                        inputs: list, side_files_from: Path, readers: list[SafetensorsCheckpoint] = (),
                        max_shard_bytes: int, desc: str, task: str = "causal_lm") -> Iterator[tuple[Path, UpcycleResult]]:
    """Write an upcycled checkpoint atomically: ``plan`` (checked against the model built on the meta device, name by
    name), ``config``, the runtime code, the side files of ``side_files_from`` (tokenizer, ...) and a card. Yields
    (the temporary folder, the result) so the caller can check it before ``output`` appears."""
    meta_model = check_against_model(plan, config, task)
    total_bytes = sum(t.nbytes for t in plan)
    with atomic_folder(output, overwrite, inputs) as tmp:
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
            shards = write_sharded(tmp, plan, max_shard_bytes, bar.update)
        for reader in readers:
            reader.close()
        custom_object_save(meta_model, tmp, config=config)
        if task == "encoder":  # one checkpoint, three Auto classes
            config.auto_map = {**(config.auto_map or {}), **ENCODER_AUTO_MAP}
        config.save_pretrained(tmp)
        copy_side_files(side_files_from, tmp)
        write_card(tmp, location=str(output))
        total, active = parameter_counts(tmp, config.num_experts, config.num_experts_per_tok)
        yield tmp, UpcycleResult(output=output.resolve(), moe_layers=list(config.moe_layers), shards=shards,
                                 total_params=total, active_params=active, bytes_written=total_bytes, seconds=0.0)


def write_moe(output: Path, inputs: list, plan: list, moe_config: UpcycledMoeConfig, adapter, options: UpcycleOptions,
              folder: Path, readers: list[SafetensorsCheckpoint], reasons: list[str], dtype: torch.dtype,
              desc: str) -> UpcycleResult:
    """Write a conversion (:func:`upcycled_checkpoint`) and verify it against ``folder`` if ``options.verify``."""
    with upcycled_checkpoint(output, plan, moe_config, overwrite=options.overwrite, inputs=inputs, side_files_from=folder,
                             readers=readers, max_shard_bytes=options.max_shard_bytes, desc=desc,
                             task=adapter.task) as (tmp, result):
        if options.verify:
            comparison = verify_conversion(folder, tmp, adapter.task)
            result.max_logit_diff = comparison.max_diff
            result.notes.append(judge(comparison, reasons, dtype))
    return result
