"""``moe-upcycle quantize IN OUT --experts int8|int4``: an upcycled model whose experts are stored in fewer bits.

Experts tolerate low precision better than dense layers (MoQE, Kim et al. 2023, arXiv 2310.02410: 3-4 bit experts
without retraining). Every MoE layer's expert tensors become integers with scales (the schemes of
``modeling/quantized_experts.py``); routers, attention, norms, embeddings and biases are copied byte for byte.
``--bits auto`` chooses a precision per expert (MC-MoE, Li et al. 2024, arXiv 2410.06270) from
``convert/precision.py``'s measurement. Streaming: one expert's weights in memory at a time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..checkpoint import PlannedTensor, SafetensorsCheckpoint, check_output, parse_size
from ..errors import CheckpointError, InvalidOptionError
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.modeling_upcycled_moe import DENSE_PREFIX
from ..modeling.quantized_experts import FLOAT, QUANT_SCHEMES, check_group_size, scale_name, scheme_summary, stored_name
from .converter import (
    UpcycleResult,
    check_source_tensors,
    checkpoint_task,
    read_float_experts,
    upcycled_checkpoint,
)

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
"""The experts' weight tensors, [E, out, in]; their biases stay as they are."""


def _experts_pattern(config: UpcycledMoeConfig) -> re.Pattern:
    """Matches an experts weight tensor of a decoder layer: group 1 the layer, group 2 the projection."""
    return re.compile(rf"^{re.escape(DENSE_PREFIX + config.decoder_layers_path)}\.(\d+)\."
                      rf"{re.escape(config.mlp_module_name)}\.experts\.({'|'.join(PROJECTIONS)})$")


def expert_weights(reader: SafetensorsCheckpoint, config: UpcycledMoeConfig) -> dict[int, dict[str, tuple[int, int]]]:
    """MoE layer -> projection -> its [out, in] (from the headers); integer experts are refused in one line."""
    pattern, found = _experts_pattern(config), {}
    for key in reader.keys():
        match = pattern.match(key)
        if match and int(match[1]) in config.moe_layers:
            info = reader.info[key]
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{key} holds {str(info.dtype).removeprefix('torch.')} values, not floats: "
                                      "quantize rounds float expert weights")
            found.setdefault(int(match[1]), {})[match[2]] = tuple(info.shape[1:])
    return found


def _finite(key: str, expert: int, row: torch.Tensor) -> torch.Tensor:
    """``row`` (one expert's [out, in]), refused in one line when it holds values no scale can represent."""
    if not torch.isfinite(row).all():
        raise CheckpointError(f"{key} holds infinite or NaN values in expert {expert}: they cannot be quantised; "
                              "repair or retrain the model first")
    return row


def check_groups(weights: dict[int, dict[str, tuple[int, int]]], group_size: int, schemes: set[str]) -> None:
    """Refuse a group size that does not fit every projection a grouped scheme in ``schemes`` will store."""
    if not any(QUANT_SCHEMES[s].grouped for s in schemes if s != FLOAT):
        return
    dims = {name: in_features for projections in weights.values() for name, (_, in_features) in projections.items()}
    for name, in_features in dims.items():
        reason = check_group_size(in_features, group_size)
        if reason:
            fits = [g for g in (256, 128, 64, 32, 16, 8) if all(check_group_size(d, g) is None for d in dims.values())]
            hint = f"--group-size {' or '.join(map(str, fits[:2]))} fits every projection" if fits else \
                "no power-of-two group size fits every projection: use --experts int8 (one scale per row)"
            raise InvalidOptionError(f"--group-size {group_size} does not fit the experts' {name} ({reason}); {hint}")


def _planned(key: str, dtype: torch.dtype, shape: tuple[int, ...], rows: Callable[[], Iterator[torch.Tensor]],
             experts: list[int], scheme: str, group_size: int) -> list[PlannedTensor]:
    """The tensors of one projection's experts (``shape`` [E, out, in]) stored in ``scheme`` (``experts``: the ids
    of those experts, in order)."""
    _, out, in_features = shape
    if scheme == FLOAT:
        return [PlannedTensor(key, dtype, (len(experts), out, in_features),
                              lambda: (row for e, row in enumerate(rows()) if e in experts))]
    spec = QUANT_SCHEMES[scheme]
    scales: list[torch.Tensor] = []  # kept while the codes are written: the scales tensor follows them in the plan

    def quantized():
        return ((e, *spec.quantize(_finite(key, e, row), group_size)) for e, row in enumerate(rows()) if e in experts)

    def codes():
        scales.clear()
        for _, code, scale in quantized():
            scales.append(scale)
            yield code

    def scale_rows():
        kept = scales[:] if len(scales) == len(experts) else [scale for _, _, scale in quantized()]
        scales.clear()
        yield from kept

    (codes_meta, scale_meta) = spec.storage(out, in_features, group_size)
    return [PlannedTensor(stored_name(key, scheme), codes_meta.dtype, (len(experts), *codes_meta.shape), codes),
            PlannedTensor(scale_name(key, scheme), scale_meta.dtype, (len(experts), *scale_meta.shape), scale_rows)]


def plan_quantized(reader: SafetensorsCheckpoint, config: UpcycledMoeConfig, precision: dict[str, list[str]],
                   group_size: int) -> list[PlannedTensor]:
    """Every tensor of ``reader``, with each MoE layer's expert weights split by the precision of their experts."""
    pattern, plan = _experts_pattern(config), []
    for key in reader.keys():
        info, match = reader.info[key], pattern.match(key)
        if match is None or match[1] not in precision:
            plan.append(PlannedTensor(key, info.dtype, info.shape, lambda key=key: [reader.get(key)]))
            continue
        schemes = precision[match[1]]
        for scheme in dict.fromkeys(schemes):  # first-use order
            experts = [e for e, s in enumerate(schemes) if s == scheme]
            plan += _planned(key, info.dtype, info.shape, lambda key=key: reader.iter_rows(key), experts, scheme, group_size)
    return plan


def quantize(folder: str | Path, output: str | Path, *, experts: str | None = "int8", group_size: int = 64,
             bits: str = "uniform", target_bits: float | None = None, data: str | Path | None = None,
             block_size: int = 256, max_tokens: int | None = 50_000, overwrite: bool = False,
             max_shard_size: int | str = "5GB", backend: str = "native") -> UpcycleResult:
    """Write the upcycled checkpoint ``folder`` to ``output`` with its experts quantised.

    ``bits="uniform"``: every expert in ``experts`` (``int8``: symmetric per output row; ``int4``: two values per byte,
    one scale per ``group_size`` input columns). ``bits="auto"``: per expert, from how often ``data`` routes to it
    and how much each precision changes its output, so that the average over expert weights (scales included) is
    at most ``target_bits`` (``convert/precision.py``).

    ``backend="torchao"``: torchao's int8 weight-only tensors instead (``experts="int8"`` only; needs torchao to
    write and to load; see ``convert/quantize_torchao.py``).
    """
    start = time.perf_counter()
    folder, output = Path(folder), Path(output)
    if backend not in ("native", "torchao"):
        raise InvalidOptionError(f"--backend {backend!r} is invalid: expected native (the default) or torchao")
    if backend == "torchao":
        from .quantize_torchao import check_torchao_options, quantize_torchao

        check_torchao_options(experts, bits)
    schemes = _check_options(experts, group_size, bits, target_bits, data)
    if backend == "torchao":
        return quantize_torchao(folder, output, overwrite=overwrite, max_shard_size=max_shard_size)
    inputs = [folder, *([data] if data is not None else [])]
    check_output(output, overwrite, inputs)
    config = read_float_experts(folder, "quantize")
    if bits == "auto" and checkpoint_task(config) != "causal_lm":
        raise InvalidOptionError(f"--bits auto measures experts on text through a causal LM; {folder} is a "
                                 f"{checkpoint_task(config)} model: quantise it with --experts int8 or int4")
    max_shard_bytes = parse_size(max_shard_size)
    reader = SafetensorsCheckpoint(folder)
    try:
        check_source_tensors(reader, config, f"the model that {folder / 'config.json'} describes")
        weights = expert_weights(reader, config)
        if not weights:
            raise CheckpointError(f"{folder} holds no expert tensors for the MoE layers its config.json names "
                                  f"({config.moe_layers}); is the checkpoint complete?")
        check_groups(weights, group_size, schemes)
        if bits == "auto":
            from .precision import choose_precision

            reader.close()
            float_bits = 8 * _experts_dtype(reader, config).itemsize
            choice = choose_precision(folder, data, weights, num_experts=config.num_experts, float_bits=float_bits,
                                      target_bits=target_bits, group_size=group_size, block_size=block_size,
                                      max_tokens=max_tokens)
            precision, record = choice.precision, choice.record()
        else:
            precision = {str(layer): [experts] * config.num_experts for layer in weights}
            record = {"scheme": experts}
        record["backend"] = "native"
        flags = f"--experts {experts}" if bits == "uniform" else f"--bits auto --target-bits {target_bits} --data {data}"
        record["command"] = f"moe-upcycle quantize {folder} {output} {flags} --group-size {group_size}"
        plan = plan_quantized(reader, config, precision, group_size)
    except BaseException:
        reader.close()
        raise
    config.expert_precision, config.expert_group_size = precision, group_size
    record = {**record, "group_size": group_size, "average_bits": average_bits(plan, weights, config),
              "float_dtype": str(_experts_dtype(reader, config)).removeprefix("torch.")}
    upcycling = dict(config.upcycling or {})
    upcycling["quantized"] = record
    upcycling["inexact_reasons"] = [*upcycling.get("inexact_reasons", []),
                                    f"the experts are quantised ({scheme_summary(precision)})"]
    config.upcycling = upcycling
    with upcycled_checkpoint(output, plan, config, overwrite=overwrite, inputs=inputs,
                             side_files_from=folder, readers=[reader], max_shard_bytes=max_shard_bytes,
                             desc="Quantizing", task=checkpoint_task(config)) as (_, result):
        result.notes.append(f"experts stored at {record['average_bits']:.3f} bits per weight on average, scales "
                             f"included ({scheme_summary(precision)})")
    result.seconds = time.perf_counter() - start
    return result


def _experts_dtype(reader: SafetensorsCheckpoint, config: UpcycledMoeConfig) -> torch.dtype:
    """The float dtype of the checkpoint's expert weights (what ``export --dequantize`` writes back)."""
    pattern = _experts_pattern(config)
    return next(info.dtype for key, info in reader.info.items() if pattern.match(key))


def average_bits(plan: list[PlannedTensor], weights: dict[int, dict[str, tuple[int, int]]],
                 config: UpcycledMoeConfig) -> float:
    """Stored bits per expert weight (integers and scales, or the float tensors) over every MoE layer."""
    numel = sum(config.num_experts * out * in_features for projections in weights.values()
                for out, in_features in projections.values())
    pattern = re.compile(_experts_pattern(config).pattern.rstrip("$") + r"(_\w+)?$")
    stored = sum(t.nbytes for t in plan if pattern.match(t.name) and not t.name.endswith("_bias"))
    return round(8 * stored / numel, 4)


def _check_options(experts: str | None, group_size: int, bits: str, target_bits: float | None,
                   data: str | Path | None) -> set[str]:
    """The schemes this run may store; one line for each bad option, before anything is read."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise InvalidOptionError(f"--group-size {group_size!r} is invalid: expected an even integer >= 2 (e.g. 64)")
    if bits == "auto":
        if target_bits is None or data is None:
            raise InvalidOptionError("--bits auto needs --target-bits B (average bits per expert weight) and --data FILE "
                                     "(text to measure each expert's use on)")
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not 0 < target_bits <= 32:
            raise InvalidOptionError(f"--target-bits {target_bits!r} is invalid: expected a number of bits in (0, 32]")
        return {*QUANT_SCHEMES, FLOAT}
    if bits != "uniform":
        raise InvalidOptionError(f"--bits {bits!r} is invalid: expected uniform (every expert in --experts) or auto")
    if target_bits is not None or data is not None:
        raise InvalidOptionError("--target-bits and --data choose bits per expert: add --bits auto")
    if experts not in QUANT_SCHEMES:
        raise InvalidOptionError(f"--experts {experts!r} is not a quantisation scheme: expected one of "
                                 f"{', '.join(QUANT_SCHEMES)}")
    return {experts}


__all__ = ["PROJECTIONS", "average_bits", "expert_weights", "plan_quantized", "quantize"]
