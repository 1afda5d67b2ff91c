"""Bad input: one clear error line from the CLI, no traceback, and nothing left behind."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_upcycle.cli import main
from moe_upcycle.convert import converter

from .families import build_dense


@pytest.fixture
def dense(tmp_path):
    return build_dense("llama", tmp_path / "dense", shard_size="20KB")


def _fails(capsys, args, *needles):
    capsys.readouterr()  # drop what building the fixture printed
    code = main(["convert", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("moe-upcycle: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _nothing_left(parent, name="out"):
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]
    assert leftovers == []


def test_unknown_model_type(tmp_path, capsys):
    config = AutoConfig.for_model("bloom", vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    _fails(capsys, [tmp_path / "bloom", tmp_path / "out", "--num-experts", "4"], "'bloom' is not supported", "llama", "gpt2")
    _nothing_left(tmp_path)


def test_top_k_larger_than_experts(dense, tmp_path, capsys):
    _fails(capsys, [dense, tmp_path / "out", "--num-experts", "4", "--top-k", "5"], "top_k=5", "num_experts=4")
    _nothing_left(tmp_path)


def test_layer_out_of_range(dense, tmp_path, capsys):
    _fails(capsys, [dense, tmp_path / "out", "--num-experts", "4", "--layers", "0,7"], "layers='0,7'", "[0, 2]")
    _nothing_left(tmp_path)


def test_bad_layer_syntax(dense, tmp_path, capsys):
    _fails(capsys, [dense, tmp_path / "out", "--layers", "odd"], "every:N")


def test_missing_shard(dense, tmp_path, capsys):
    index = json.loads((dense / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (dense / victim).unlink()
    _fails(capsys, [dense, tmp_path / "out", "--num-experts", "4"], victim, "missing")
    _nothing_left(tmp_path)


def test_corrupt_header(dense, tmp_path, capsys):
    shard = sorted(dense.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\x00garbage"
    shard.write_bytes(bytes(data))
    _fails(capsys, [dense, tmp_path / "out", "--num-experts", "4"], shard.name, "not a valid safetensors file")
    _nothing_left(tmp_path)


def test_truncated_shard(dense, tmp_path, capsys):
    shard = sorted(dense.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(capsys, [dense, tmp_path / "out", "--num-experts", "4"], shard.name)
    _nothing_left(tmp_path)


def test_existing_output_needs_overwrite(dense, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails(capsys, [dense, out, "--num-experts", "4"], "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only what moe-upcycle wrote: a folder of someone else's files is refused too
    _fails(capsys, [dense, out, "--num-experts", "4", "--overwrite"], "not written by moe-upcycle", "keep.txt")
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    assert main(["convert", str(dense), str(out), "--num-experts", "4"]) == 0
    (out / "extra.txt").write_text("ours to replace")
    assert main(["convert", str(dense), str(out), "--num-experts", "2", "--top-k", "1", "--overwrite"]) == 0
    assert not (out / "extra.txt").exists() and json.loads((out / "config.json").read_text())["num_experts"] == 2
    _nothing_left(tmp_path, ".out")


def test_pickle_only_checkpoint_is_refused(tmp_path, capsys):
    src = tmp_path / "pickled"
    src.mkdir()
    AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, num_hidden_layers=2).save_pretrained(src)
    # A file that would run code if unpickled: it must never be opened.
    (src / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    _fails(capsys, [src, tmp_path / "out", "--num-experts", "4"], "pytorch_model.bin", "never unpickles", "safetensors")
    assert not (tmp_path / "pwned").exists()
    _nothing_left(tmp_path)


def test_failure_mid_write_keeps_old_output(dense, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(dense), str(out), "--num-experts", "4"]) == 0
    before = (out / "config.json").read_text()

    def explode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(converter, "write_sharded", explode)
    capsys.readouterr()
    assert main(["convert", str(dense), str(out), "--num-experts", "8", "--overwrite"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "Upcycling" not in line and line.strip()]  # no bar
    assert len(err) == 1 and "No space left on device" in err[0] and "free some space" in err[0], err
    assert (out / "config.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_not_a_folder_nor_hub_id(tmp_path, capsys):
    _fails(capsys, [tmp_path / "no" / "such" / "dir", tmp_path / "out"], "neither an existing local folder")


def test_zero_router_std_refused(dense, tmp_path, capsys):
    _fails(capsys, [dense, tmp_path / "out", "--router-init-std", "0"], "router_init_std=0.0", "same experts")


def test_expert_noise_is_reported_not_failed(dense, tmp_path, capsys):
    code = main(["convert", str(dense), str(tmp_path / "out"), "--num-experts", "4", "--expert-noise", "0.05", "--verify"])
    out = capsys.readouterr().out
    assert code == 0 and "not expected to be exact: expert_noise=0.05" in out
    diff = float(out.split("max |logit diff| ")[1].split()[0])
    assert diff > 1e-4
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    experts = state["model.model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts[0], experts[1])
