"""The command line as a new user meets it (issue 10, smaller things): the help names every subcommand, every flag
takes both spellings (``--block-size`` and ``--block_size``), and ``export`` prints its notes."""

from __future__ import annotations

import argparse

import pytest

import moe_upcycle
from moe_upcycle.cli import build_parser, main

from .families import build_dense

SUBCOMMANDS = ("convert", "mix", "materialize", "shrink", "quantize", "train", "merge", "evaluate", "analyze", "push",
               "export", "demo")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_names_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # the paragraph after the usage line
    for name in SUBCOMMANDS:
        assert name in description, (name, description)
        assert f"\n    {name} " in text, name  # listed with its one-line help
    assert set(_subparsers(build_parser())) == set(SUBCOMMANDS)


def test_every_flag_takes_both_spellings():
    """As ``train`` (HfArgumentParser) does: ``--max-shard-size`` and ``--max_shard_size`` are one flag."""
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            for option in action.option_strings:
                body = option[2:]
                if option.startswith("--") and ("-" in body or "_" in body):
                    other = "--" + (body.replace("-", "_") if "-" in body else body.replace("_", "-"))
                    assert other in action.option_strings, (name, option)


@pytest.mark.parametrize("argv, dest, value", [
    (["evaluate", "m", "--validation-file", "v.txt", "--block-size", "8"], "block_size", 8),
    (["evaluate", "m", "--validation_file", "v.txt", "--output-json", "e.json"], "output_json", "e.json"),
    (["convert", "a", "b", "--num_experts", "4"], "num_experts", 4),
    (["convert", "a", "b", "--router_init_std", "0.1"], "router_init_std", 0.1),
    (["push", "f", "o/r", "--dry_run", "--commit_message", "m"], "commit_message", "m"),
    (["export", "a", "b", "--max_shard_size", "1GB"], "max_shard_size", "1GB"),
    (["analyze", "m", "--data", "a=x.txt", "--max-tokens", "64", "--data", "b=y.txt"], "data", ["a=x.txt", "b=y.txt"]),
])
def test_both_spellings_parse(argv, dest, value):
    assert getattr(build_parser().parse_args(argv), dest) == value


def test_export_prints_its_notes(tmp_path, capsys):
    dense = build_dense("llama", tmp_path / "dense")
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "moe"), str(tmp_path / "native")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("exported llama MoE")
    notes = [line for line in out if line.startswith("note: ")]
    assert any("router_z_loss_coef" in line and "dropped" in line for line in notes), out
    assert any("output_router_logits=True" in line for line in notes), out
