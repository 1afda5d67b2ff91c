"""``moe-upcycle quantize IN OUT --backend torchao``: the experts in torchao's int8 weight-only format.

An option beside the native schemes (``convert/quantize.py``), for users who already run torchao. Transformers
quantises a model with torchao only through ``TorchAoConfig``, and torchao reaches the fused 3-D expert tensors
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) only through a parameter-level config: an
``FqnToConfig`` whose regular expression names those parameters, each mapped to ``Int8WeightOnlyConfig`` (one
float scale per output row of each expert). Routers, attention, norms and embeddings are not named, so they are
loaded as they are. The output is safetensors (torchao's flattened tensors, ``_gate_up_proj_qdata`` /
``_scale`` / ``_zero_point``, described in the file's metadata), never a pickle.

torchao's ``Int8Tensor`` implements indexing and ``linear`` but not the transposes and batched matmuls of the
fused kernels (``grouped_mm``, ``batched_mm``, our ``sorted_mm``: measured with torchao 0.18 on CPU), so the
output pins the eager experts loop: ``"experts_implementation": "eager"`` in its config.json, which
``from_pretrained`` honours, and the model class maps its default to ``eager`` (and refuses any other kernel in one
line) for a torchao-quantised config.

Unlike the native backend, this one loads the model (Transformers quantises each expert tensor as it loads it),
needs torchao to write and to load the result, and stores int8 only.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

from ..card import parameter_counts, write_card
from ..checkpoint import (
    PICKLE_SUFFIXES,
    SafetensorsCheckpoint,
    TensorInfo,
    atomic_folder,
    check_output,
    copy_side_files,
    parse_size,
)
from ..errors import CheckpointError, InvalidOptionError
from ..modeling.configuration_upcycled_moe import UpcycledMoeConfig
from ..modeling.modeling_upcycled_moe import TORCHAO_EXPERTS_IMPLEMENTATION, UpcycledMoeForCausalLM
from .converter import UpcycleResult, checkpoint_task, read_float_experts
from .quantize import PROJECTIONS, _experts_pattern

MIN_TORCHAO = "0.18.0"  # the release this backend was tested with (CPU, torch 2.13)
MISSING = "--backend torchao needs torchao (pip install torchao); the default native backend needs nothing"


def require_torchao() -> str:
    """torchao's version, or one line saying why this backend cannot run here."""
    try:
        import torchao
        from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig  # noqa: F401
    except ImportError:
        raise InvalidOptionError(MISSING) from None
    from packaging.version import Version

    version = getattr(torchao, "__version__", "0")
    if Version(version.split("+")[0]) < Version(MIN_TORCHAO):
        raise InvalidOptionError(f"--backend torchao needs torchao >= {MIN_TORCHAO} (found {version}): "
                                 "pip install -U torchao, or use the default native backend")
    return version


def check_torchao_options(experts: str | None, bits: str) -> None:
    """One line for the options this backend does not take (before anything is read)."""
    if bits != "uniform":
        raise InvalidOptionError("--bits auto chooses a precision per expert, which only the native backend stores: "
                                 "drop --backend torchao")
    if experts != "int8":
        raise InvalidOptionError(f"--backend torchao writes int8 weight-only experts (torchao's Int8WeightOnlyConfig); "
                                 f"--experts {experts} needs the default native backend")


def experts_regex(config: UpcycledMoeConfig, projections: set[str]) -> str:
    """The ``FqnToConfig`` key (``re:`` + a full-match expression) of every MoE layer's expert weight tensors: the
    parameter names of the loaded model, which are the checkpoint's names."""
    pattern = _experts_pattern(config).pattern.removeprefix("^").removesuffix("$")
    names = "|".join(p for p in PROJECTIONS if p in projections)
    return "re:" + pattern.replace(f"({'|'.join(PROJECTIONS)})", f"({names})")


def quantize_torchao(folder: str | Path, output: str | Path, *, overwrite: bool = False,
                     max_shard_size: int | str = "5GB") -> UpcycleResult:
    """Write the upcycled checkpoint ``folder`` to ``output`` with every MoE layer's expert weights quantised by
    torchao (``Int8WeightOnlyConfig``, per output row) through ``TorchAoConfig``; every other tensor as it is."""
    start = time.perf_counter()
    folder, output = Path(folder), Path(output)
    version = require_torchao()
    check_output(output, overwrite, [folder])
    config = read_float_experts(folder, "quantize")
    task = checkpoint_task(config)
    if task != "causal_lm":
        raise InvalidOptionError(f"--backend torchao writes causal LMs; {folder} is a {task} model: quantise it with the "
                                 "default native backend")
    max_shard_bytes = parse_size(max_shard_size)
    reader = SafetensorsCheckpoint(folder)
    try:
        pattern = _experts_pattern(config)
        expected = {key: reader.info[key] for key in reader.keys()
                    if (m := pattern.match(key)) and int(m[1]) in config.moe_layers}
    finally:
        reader.close()
    if not expected:
        raise CheckpointError(f"{folder} holds no expert tensors for the MoE layers its config.json names "
                              f"({config.moe_layers}); is the checkpoint complete?")
    float_dtype = next(iter(expected.values())).dtype
    key = experts_regex(config, {pattern.match(name)[2] for name in expected})
    model = _load_quantized(folder, key)
    _check_quantized(model, set(expected))

    record = {"backend": "torchao", "scheme": "int8", "torchao_version": version,
              "torchao_config": f"FqnToConfig({{{key!r}: Int8WeightOnlyConfig()}})",
              "experts_implementation": TORCHAO_EXPERTS_IMPLEMENTATION,
              "float_dtype": str(float_dtype).removeprefix("torch."),
              "command": f"moe-upcycle quantize {folder} {output} --backend torchao --experts int8"}
    upcycling = dict(model.config.upcycling or {})
    upcycling["inexact_reasons"] = [*upcycling.get("inexact_reasons", []),
                                    "the experts are quantised (torchao int8 weight-only, one scale per output row)"]
    with atomic_folder(output, overwrite, [folder]) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_bytes)
        mode = 0o666 & ~_umask()  # safetensors creates its files 0600; give them a new file's usual permissions
        for shard in tmp.glob("*.safetensors"):
            shard.chmod(mode)
        pickles = sorted(p.name for p in tmp.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:  # Transformers 5 writes safetensors only; refuse rather than publish a pickle
            raise CheckpointError(f"saving the torchao model wrote pickle files ({', '.join(pickles)}); nothing was "
                                  "written: use the default native backend")
        stored = SafetensorsCheckpoint(tmp)
        try:
            record["average_bits"] = _average_bits(stored, expected)
        finally:
            stored.close()
        upcycling["quantized"] = record
        _pin_config(tmp / "config.json", upcycling)
        copy_side_files(folder, tmp)
        write_card(tmp, location=str(output))
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        total, active = parameter_counts(tmp, config.num_experts, config.num_experts_per_tok)
        written = sum((tmp / name).stat().st_size for name in shards)
    result = UpcycleResult(output=output.resolve(), moe_layers=list(config.moe_layers), shards=shards,
                           total_params=total, active_params=active, bytes_written=written,
                           seconds=time.perf_counter() - start)
    result.notes.append(f"experts stored by torchao {version} as int8 weight-only tensors, "
                        f"{record['average_bits']:.3f} bits per weight on average (scales and zero points included); "
                        f"loading needs torchao and runs the {TORCHAO_EXPERTS_IMPLEMENTATION} experts kernel")
    return result


def _load_quantized(folder: Path, key: str):
    """The upcycled causal LM of ``folder`` in its own dtype, its expert tensors quantised while loading."""
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    quantization = TorchAoConfig(quant_type=FqnToConfig({key: Int8WeightOnlyConfig()}))
    return UpcycledMoeForCausalLM.from_pretrained(folder, dtype="auto", quantization_config=quantization,
                                                  use_safetensors=True).eval()


def _check_quantized(model, expected: set[str]) -> None:
    """Every expert weight tensor, and nothing else, holds a torchao tensor."""
    from torchao.utils import TorchAOBaseTensor

    quantized = {name for name, p in model.named_parameters() if isinstance(p, TorchAOBaseTensor)
                 or isinstance(getattr(p, "data", None), TorchAOBaseTensor)}
    if quantized != expected:
        missed, extra = sorted(expected - quantized), sorted(quantized - expected)
        raise CheckpointError(f"torchao did not quantise exactly the expert weights (not quantised: {missed[:3]}, "
                              f"quantised besides: {extra[:3]}); nothing was written: use the default native backend")


_TORCHAO_PARTS = re.compile(r"\._(?P<param>\w+?)_(?P<part>qdata|scale|zero_point)$")


def _average_bits(stored: SafetensorsCheckpoint, expected: dict[str, TensorInfo]) -> float:
    """Stored bits per expert weight: torchao's flattened tensors of the expert weights (``<module>._<param>_qdata``,
    ``_scale``, ``_zero_point``) over their element count."""
    numel = sum(math.prod(info.shape) for info in expected.values())
    nbytes = 0
    for key, info in stored.info.items():
        match = _TORCHAO_PARTS.search(key)
        if match and f"{key[: match.start()]}.{match['param']}" in expected:
            nbytes += info.nbytes
    if not nbytes:
        raise CheckpointError("the saved torchao checkpoint holds none of the flattened expert tensors "
                              "(<module>._<name>_qdata); nothing was written: use the default native backend")
    return round(8 * nbytes / numel, 4)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pin_config(path: Path, upcycling: dict) -> None:
    """Record the run and pin the experts kernel in the saved config.json (``experts_implementation`` is what
    ``PreTrainedConfig`` reads back; Transformers does not save it itself)."""
    config = json.loads(path.read_text())
    config["upcycling"] = upcycling
    config["experts_implementation"] = TORCHAO_EXPERTS_IMPLEMENTATION
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


__all__ = ["MISSING", "check_torchao_options", "experts_regex", "quantize_torchao", "require_torchao"]
