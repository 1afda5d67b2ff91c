"""Outputs never lose data: --overwrite never removes an input or a folder that is not ours, stale temporary folders
of ours are cleaned (and a missing OUTPUT restored), outputs follow the umask, options are typed strictly,
verification never blesses NaN, and file-system errors end in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_upcycle
from moe_upcycle.checkpoint import output
from moe_upcycle.cli import main
from moe_upcycle.convert import converter
from moe_upcycle.errors import InvalidOptionError

from .families import build_dense


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    return build_dense("llama", tmp_path_factory.mktemp("dense") / "dense", shard_size="20KB")


@pytest.fixture
def dense(dense_source, tmp_path):
    """A private copy in this test's folder (tests may damage it)."""
    return Path(shutil.copytree(dense_source, tmp_path / "dense"))


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file (and empty folder) under ``folder`` with the SHA-256 of its bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir() and not any(path.iterdir()):
            out[rel + "/"] = "empty"
    return out


def fails(capsys, argv, *needles) -> str:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moe-upcycle")]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("moe-upcycle: error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


# -- 1. --overwrite never removes an input or a folder that is not ours ------------------------------------------

def test_output_equal_to_source_is_refused_even_with_overwrite(dense, tmp_path, capsys):
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", dense, dense, "--num-experts", "4", "--overwrite"], "is the input")
    assert tree_hashes(tmp_path) == before


def test_output_containing_the_source_is_refused(tmp_path, dense_source, capsys):
    project = tmp_path / "project"
    shutil.copytree(dense_source, project / "src")
    (project / "notes.txt").write_text("unrelated and precious")
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", project / "src", project, "--num-experts", "4", "--overwrite"], "contains the input")
    fails(capsys, ["convert", project / "src" / ".." / "src", project / ".", "--overwrite"], "contains the input")
    assert tree_hashes(tmp_path) == before


def test_existing_output_inside_the_source_is_not_replaced(dense, tmp_path, capsys):
    assert main(["convert", str(dense), str(dense / "moe"), "--num-experts", "4"]) == 0  # a fresh output may go there
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", dense, dense / "moe", "--num-experts", "4", "--overwrite"], "inside the input")
    assert tree_hashes(tmp_path) == before


def test_router_prompts_file_is_an_input(dense, tmp_path, capsys):
    prompts = tmp_path / "prompts" / "p.yaml"
    prompts.parent.mkdir()
    prompts.write_text("experts:\n  - positive: [a]\n")
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", dense, prompts.parent, "--router-init", "hidden", "--router-prompts", prompts, "--overwrite"],
          "contains the input")
    assert tree_hashes(tmp_path) == before


def test_symlinked_output_to_the_source_is_refused(dense, tmp_path, capsys):
    (tmp_path / "link").symlink_to(dense, target_is_directory=True)
    before = tree_hashes(dense)
    fails(capsys, ["convert", dense, tmp_path / "link", "--overwrite"], "is the input")
    assert tree_hashes(dense) == before


# -- 2. typed options: YAML and the Python API as strict as the command line --------------------------------------

@pytest.mark.parametrize("yaml_text, needle", [
    ('overwrite: "no"\n', "is not a boolean"),
    ("verify: yes please\n", "is not a boolean"),
    ("top_k: true\n", "is not an integer"),
    ("num_experts: 4.5\n", "is not an integer"),
    ("router_type: mixtral\n", "one of topk_renorm"),
    ("expert_noise: [1]\n", "is not a number"),
    ("top_k: [1\n", "not valid YAML at line 2"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_recipe_values_are_typed(dense, tmp_path, capsys, yaml_text, needle):
    out = tmp_path / "out"
    assert main(["convert", str(dense), str(out), "--num-experts", "4"]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml_text)
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", "--config", recipe, dense, out, "--num-experts", "2", "--top-k", "1"], needle)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("options, needle", [
    (dict(verify="no"), "verify='no'"),
    (dict(overwrite="no"), "overwrite='no'"),
    (dict(layers=[True]), "layers=[True]"),
    (dict(top_k=True), "top_k=True"),
    (dict(num_experts="8"), "num_experts='8'"),
    (dict(router_aux_loss_coef=float("inf")), "finite"),
    (dict(router_init_std=float("nan")), "router_init_std=nan"),
    (dict(max_shard_size=[1]), "max_shard_size"),
])
def test_api_options_are_typed(dense, tmp_path, options, needle):
    with pytest.raises(InvalidOptionError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        moe_upcycle.upcycle(dense, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


# -- 3. verification never calls a broken model exact --------------------------------------------------------------

def _float16_source(dense: Path, folder: Path, down_value: float) -> Path:
    model = AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.fill_(down_value)
    model.half().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", [["--router-type", "softmax_topk"], ["--granularity", "4", "--num-experts", "8",
                                                                         "--top-k", "4"]])
def test_float16_overflow_of_scaled_experts_fails_verification(dense, tmp_path, capsys, caplog, recipe):
    source = _float16_source(dense, tmp_path / "fp16", 30000.0)  # x E/k = 4 or x G = 4 overflows float16 (65504)
    capsys.readouterr()
    code = main(["convert", str(source), str(tmp_path / "out"), "--num-experts", "8", "--top-k", "2", *recipe, "--verify"])
    err = capsys.readouterr().err
    assert code == 2
    assert "exceed the largest float16 value" in caplog.text  # warned before writing
    assert "outputs are not finite" in err and "--dtype bfloat16 or float32" in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_nan_source_is_reported_not_blessed(dense, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    fails(capsys, ["convert", tmp_path / "nan", tmp_path / "out", "--num-experts", "4", "--verify"],
          "dense source's own outputs are not finite")
    assert not (tmp_path / "out").exists()


def test_judge_fails_on_nan_difference_and_records_reasons():
    nan = converter.Comparison(float("nan"), True, True)
    with pytest.raises(moe_upcycle.errors.VerificationError):
        converter.judge(nan, [], torch.float32)
    assert "not expected to be exact" in converter.judge(converter.Comparison(0.3, True, True), ["noise"], torch.float32)


def test_dtype_cast_is_recorded_as_inexact_only_when_lossy(dense, tmp_path):
    narrow = moe_upcycle.upcycle(dense, tmp_path / "bf16", num_experts=4, dtype="bfloat16", verify=True)
    reasons = json.loads((tmp_path / "bf16" / "config.json").read_text())["upcycling"]["inexact_reasons"]
    assert reasons == ["the weights were cast from float32 to bfloat16"]
    assert "not expected to be exact" in narrow.notes[-1]
    moe_upcycle.upcycle(dense, tmp_path / "f32", num_experts=4, dtype="float32")
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["upcycling"]["inexact_reasons"] == []


# -- 5. leftovers of interrupted runs ------------------------------------------------------------------------------

def _stale(parent: Path, kind: str, marked: bool = True) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".out.{kind}-", dir=parent))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    if marked:
        (folder / output.MARKER).write_text("{}")
    return folder


def test_stale_temporary_folders_of_ours_are_removed(dense, tmp_path):
    stale = [_stale(tmp_path, "tmp"), _stale(tmp_path, "old")]
    foreign = _stale(tmp_path, "tmp", marked=False)  # same name pattern, no marker: not ours, kept
    moe_upcycle.upcycle(dense, tmp_path / "out", num_experts=4)
    assert not any(p.exists() for p in stale)
    assert foreign.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [foreign.name]


def test_a_live_runs_temporary_folder_is_left_alone(dense, tmp_path):
    live = _stale(tmp_path, "tmp")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(live / output.MARKER)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        moe_upcycle.upcycle(dense, tmp_path / "out", num_experts=4)
        assert live.is_dir()
    finally:
        holder.kill()
        holder.wait()
    moe_upcycle.upcycle(dense, tmp_path / "out", num_experts=4, overwrite=True)
    assert not live.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_missing_after_a_crash_mid_swap_is_restored(dense, tmp_path, capsys, overwrite):
    out = tmp_path / "out"
    moe_upcycle.upcycle(dense, out, num_experts=4)
    previous = tree_hashes(out)
    backup = _stale(tmp_path, "old")  # what a run killed between its two renames leaves
    (backup / "model.safetensors").unlink()
    os.replace(out, backup / "old")
    args = ["convert", str(dense), str(out), "--num-experts", "2", "--top-k", "1"]
    if overwrite:
        assert main([*args, "--overwrite"]) == 0
        assert json.loads((out / "config.json").read_text())["num_experts"] == 2
    else:
        fails(capsys, args, "--overwrite")  # restored first, then refused like any existing output
        assert tree_hashes(out) == previous
    assert not backup.exists()


# -- 6. permissions follow the umask -------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folder_follows_umask(dense, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        moe_upcycle.upcycle(dense, tmp_path / "out", num_experts=4)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == mode & 0o666


# -- 8. one clear line for broken inputs and unwritable outputs ----------------------------------------------------

def _single(dense_source: Path, folder: Path) -> Path:
    AutoModelForCausalLM.from_pretrained(dense_source).save_pretrained(folder)
    return folder


def _replace_header(shard: Path, header: bytes) -> None:
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    shard.write_bytes(raw[:8] + header.ljust(length) + raw[8 + length:])


def _header_list(folder):
    _replace_header(folder / "model.safetensors", b"[1, 2]")


def _header_bad_shape(folder):
    _replace_header(folder / "model.safetensors", b'{"x": {"dtype": "F32", "shape": "big", "data_offsets": [0, 4]}}')


def _weight_map_list(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))


def _config_field_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "sixty-four"}))


def _config_not_object(folder):
    (folder / "config.json").write_text("[1, 2]")


def _safetensors_is_a_folder(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


@pytest.mark.parametrize("damage, needle", [
    (_header_list, "header is a JSON list"),
    (_header_bad_shape, "has shape 'big'"),
    (_weight_map_list, "weight_map is a list"),
    (_config_field_type, "hidden_size"),
    (_config_not_object, "config.json"),
    (_safetensors_is_a_folder, "is a folder, not a safetensors file"),
])
def test_broken_source_is_one_line(dense_source, tmp_path, capsys, damage, needle):
    source = _single(dense_source, tmp_path / "src")
    damage(source)
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", source, tmp_path / "out", "--num-experts", "4"], needle)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("code, needle", [(errno.ENOSPC, "free some space"), (errno.EFBIG, "--max-shard-size"),
                                          (errno.EROFS, "read-only"), (errno.EACCES, "you can write to")])
def test_write_errors_are_one_line_and_leave_nothing(dense, tmp_path, capsys, monkeypatch, code, needle):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(converter, "write_sharded", fail)
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", dense, tmp_path / "deep" / "out", "--num-experts", "4"], os.strerror(code), needle)
    assert tree_hashes(tmp_path) == before  # the parents it created are gone too


def test_output_under_a_file_or_too_long_is_one_line(dense, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    before = tree_hashes(tmp_path)
    fails(capsys, ["convert", dense, tmp_path / "a-file" / "out"], "is a file, not a folder")
    fails(capsys, ["convert", dense, tmp_path / ("x" * 300)], "shorter output name")
    assert tree_hashes(tmp_path) == before


def test_read_only_parent_is_one_line(dense, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("this user (root) writes into read-only folders; the EACCES path is tested with a fake error")
        fails(capsys, ["convert", dense, parent / "out"], "Permission denied")
    finally:
        parent.chmod(0o755)


def test_two_runs_racing_into_one_output(dense, tmp_path, capsys, monkeypatch):
    """Run B finishes into OUTPUT while run A is writing: A refuses to replace it (no --overwrite), B's output stays."""
    out = tmp_path / "out"
    write_sharded = converter.write_sharded

    def slow_write(*args, **kwargs):
        monkeypatch.setattr(converter, "write_sharded", write_sharded)
        assert main(["convert", str(dense), str(out), "--num-experts", "2", "--top-k", "1"]) == 0  # run B
        return write_sharded(*args, **kwargs)

    monkeypatch.setattr(converter, "write_sharded", slow_write)
    fails(capsys, ["convert", dense, out, "--num-experts", "4"], "exists and is not empty")
    assert json.loads((out / "config.json").read_text())["num_experts"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out"]
