"""The card's "Reproduce" command rebuilds the model: same config.json, same tensors, for every recipe in configs/."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_upcycle.cli import main

from .families import build_dense

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = [[f"--config={p}"] for p in sorted(CONFIGS.glob("upcycle_*.yaml"))]
OTHERS = [["--layers", "0,2", "--router-aux-loss-coef", "0.05", "--router-z-loss-coef", "0", "--router-jitter-noise",
           "0.01", "--expert-noise", "0.02", "--seed", "3", "--num-experts", "4"],
          ["--router-type", "sigmoid", "--layers", "every:2", "--dtype", "bfloat16"]]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = build_dense("llama", tmp_path_factory.mktemp("src") / "dense", shard_size="10MB")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(folder)  # prompts need one
    return folder


def reproduce_command(card: str) -> list[str]:
    line = next(line for line in card.splitlines() if line.startswith("moe-upcycle convert "))
    return shlex.split(line)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def _name(recipe: list[str]) -> str:
    return Path(recipe[0].split("=")[-1]).stem if "=" in recipe[0] else " ".join(recipe[:2])


@pytest.mark.parametrize("recipe", RECIPES + OTHERS, ids=_name)
def test_card_reproduce_command_rebuilds_the_model(source, tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(Path(__file__).parents[1])  # recipes name configs/... files relative to the repository
    first = tmp_path / "first"
    assert main(["convert", str(source), str(first), *recipe]) == 0
    command = reproduce_command((first / "README.md").read_text())
    assert command[:4] == ["moe-upcycle", "convert", str(source), "OUTPUT"], command
    second = tmp_path / "second"
    assert main([*command[1:3], str(second), *command[4:]]) == 0
    assert json.loads((second / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    a, b = tensors(first), tensors(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("flags, exact, reason", [
    ([], True, None),
    (["--dtype", "bfloat16"], False, "the weights were cast from float32 to bfloat16"),
    (["--expert-noise", "0.01"], False, "expert_noise=0.01"),
])
def test_card_and_verify_read_one_record_of_exactness(source, tmp_path, capsys, flags, exact, reason):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["convert", str(source), str(out), "--num-experts", "4", "--verify", *flags]) == 0
    printed = capsys.readouterr().out
    card = (out / "README.md").read_text()
    recorded = json.loads((out / "config.json").read_text())["upcycling"]["inexact_reasons"]
    assert recorded == ([] if exact else [reason])
    assert ("computes exactly what the dense model does" in card) == exact
    assert ("computes what the dense model did" in printed) == exact
    if not exact:
        assert f"does not compute exactly what the dense model does: {reason}" in card
        assert f"not expected to be exact: {reason}" in printed
