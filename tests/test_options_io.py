"""Layer selection syntax and the streaming safetensors writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moe_upcycle.checkpoint import PlannedTensor, SafetensorsCheckpoint, parse_size, write_sharded
from moe_upcycle.convert.options import UpcycleOptions, resolve_layers
from moe_upcycle.errors import InvalidOptionError


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("every:2", [1, 3, 5]),
        ("every:3:0", [0, 3]),
        ("first-half", [0, 1, 2]),
        ("second-half", [3, 4, 5]),
        ("5,0,3", [0, 3, 5]),
        ([4, 1], [1, 4]),
    ],
)
def test_layer_specs(spec, expected):
    assert resolve_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["every:0", "every:2:2", "1,1", "0-3", "6"])
def test_bad_layer_specs(spec):
    with pytest.raises(InvalidOptionError, match="layers="):
        resolve_layers(spec, 6)


def test_option_validation_names_field():
    with pytest.raises(InvalidOptionError, match="num_experts=1"):
        UpcycleOptions(num_experts=1)
    with pytest.raises(InvalidOptionError, match="dtype='int8'"):
        UpcycleOptions(dtype="int8")
    with pytest.raises(InvalidOptionError, match="max_shard_size='lots'"):
        UpcycleOptions(max_shard_size="lots")
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2KiB") == 2048


def test_writer_streams_chunks_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    tensors = [
        PlannedTensor("a.weight", torch.float32, (4, 4), lambda: [torch.arange(16, dtype=torch.float32).view(4, 4)]),
        PlannedTensor("experts", torch.bfloat16, (6, 3, 5), lambda: [base] * 6),
        PlannedTensor("ids", torch.int64, (3,), lambda: [torch.tensor([1, 2, 3])]),
    ]
    names = write_sharded(tmp_path, tensors, max_shard_bytes=100)
    assert len(names) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 64 + 180 + 24
    loaded = {}
    for name in names:
        loaded.update(load_file(tmp_path / name))
    assert torch.equal(loaded["experts"], base.expand(6, 3, 5))
    assert torch.equal(loaded["a.weight"], torch.arange(16.0).view(4, 4))
    assert torch.equal(loaded["ids"], torch.tensor([1, 2, 3]))
    reader = SafetensorsCheckpoint(tmp_path)
    assert reader.info["experts"].shape == (6, 3, 5) and torch.equal(reader.get("ids"), torch.tensor([1, 2, 3]))


def test_router_loss_defaults_follow_the_router_type():
    """Sigmoid routers balance by their bias (DeepSeek-V3): a tiny balance loss and no z-loss unless asked for."""
    from moe_upcycle.convert.options import UpcycleOptions

    assert (UpcycleOptions().router_aux_loss_coef, UpcycleOptions().router_z_loss_coef) == (0.01, 0.001)
    sigmoid = UpcycleOptions(router_type="sigmoid")
    assert (sigmoid.router_aux_loss_coef, sigmoid.router_z_loss_coef) == (1e-4, 0.0)
    assert UpcycleOptions(router_type="sigmoid", router_aux_loss_coef=0.01).router_aux_loss_coef == 0.01


def test_readme_convert_table_lists_every_flag_of_the_parser():
    """The README's convert options table and `moe-upcycle convert --help` name the same flags."""
    import re
    from pathlib import Path

    from moe_upcycle.cli import _subparser, build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## Convert"):readme.index("### Recipes")]
    first_cells = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| `")]
    documented = set(re.findall(r"`(--[a-z][a-z-]*)", "\n".join(first_cells)))
    parser = _subparser(build_parser(), "convert")
    flags = {flag for action in parser._actions for flag in action.option_strings
             if flag.startswith("--") and "_" not in flag and flag != "--help"}
    assert documented == flags
