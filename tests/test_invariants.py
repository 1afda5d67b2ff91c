"""Property tests of the safety invariants (issue 10), for every subcommand, on generated bad inputs.

Each case builds a fresh "world" folder holding the command's inputs and a sentinel file beside them, applies one
mutation (a corrupt safetensors header, an index or config.json of the wrong JSON types, LoRA factors that do not fit
their config, a missing file, a bad data file, a recipe with wrong types or a syntax error, a dangerous or unwritable
output, a bad flag), hashes the whole world, runs the command line and checks:

* the exit status is non-zero, no traceback is printed, and stderr ends with one ``moe-upcycle: error:`` line;
* nothing under the world was created, changed or removed (a failure writes nothing at all).

The cases are the cross product of the subcommands and the mutation families that apply to their inputs; the
baselines check that the unmutated world succeeds and writes only its fresh output. The bulk runs in-process
(``moe_upcycle.cli.main``); ``test_subprocess_subset`` (slow) runs a representative subset as real processes.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .families import build_dense
from .hostile import (
    Outcome,
    cli_env,
    failure_problems,
    file_size_limit,
    first_tensor,
    immutable,
    limit_memory_in_child,
    memory_limit,
    read_raw,
    run_inprocess,
    run_subprocess,
    snapshot,
    success_problems,
    tmpfs,
    tree_problems,
    weight_files,
    write_raw,
)

REPO = "test-user/tiny-moe"
UNREACHABLE = "http://127.0.0.1:9"  # loopback, closed port: connection refused at once
COMMANDS = ("convert", "mix", "materialize", "shrink", "train", "merge", "evaluate", "analyze", "push", "push-online",
            "export", "quantize", "quantize-auto")  # quantize-auto: quantize --bits auto --target-bits B --data FILE
FOLDER_OUTPUTS = ("convert", "mix", "materialize", "shrink", "merge", "export", "quantize", "quantize-auto")
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


# ----------------------------------------------------------------------------------------------- templates
class Templates:
    """Inputs built once per session; every case copies what it needs into its own world."""

    def __init__(self, root: Path, small_models, docs_files):
        import moe_upcycle
        from moe_upcycle.train import run_training

        small_dense, small_moe = small_models
        self.dense_sharded = build_dense("llama", root / "dense_sharded", shard_size="30KB")
        self.dense_single = build_dense("llama", root / "dense_single", shard_size="10MB")
        self.dense_branch = build_dense("llama", root / "dense_branch", seed=1, shard_size="30KB")  # mix's 2nd source
        self.small_dense = small_dense
        self.moe_single = small_moe
        self.moe = root / "moe"  # sharded, with the tokenizer
        moe_upcycle.upcycle(small_dense, self.moe, num_experts=4, top_k=2, max_shard_size="300KB")
        self.ours = root / "ours"  # an earlier output of moe-upcycle, for outputs that exist already
        moe_upcycle.upcycle(self.dense_single, self.ours, num_experts=2, top_k=1)
        self.shared = root / "shared"  # shared-weight LoRA experts, sharded: materialize's input
        moe_upcycle.upcycle(self.dense_sharded, self.shared, num_experts=4, top_k=2, expert_sharing="lora",
                            expert_lora_rank=4, max_shard_size="30KB")
        train, valid = docs_files
        self.train_text = train.read_text()[:6000]
        self.valid_text = valid.read_text()[:3000]
        data = root / "data"
        data.mkdir()
        (data / "train.txt").write_text(self.train_text)
        (data / "valid.txt").write_text(self.valid_text)
        self.lora = root / "lora"  # a one-step LoRA run on ``self.moe``
        run_training(["--model_name_or_path", str(self.moe), "--train_file", str(data / "train.txt"),
                      "--validation_file", str(data / "valid.txt"), "--output_dir", str(self.lora), "--use_lora",
                      "--max_steps", "1", "--block_size", "32", "--per_device_train_batch_size", "2",
                      "--max_eval_samples", "4", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
                      "--dataloader_pin_memory", "false"])
        assert (self.lora / "adapter_config.json").is_file()
        from moe_upcycle.cli import main

        self.quantized = root / "quantized"  # int4 experts: refused by quantize (again) and by export without --dequantize
        assert main(["quantize", str(self.moe), str(self.quantized), "--experts", "int4"]) == 0


@pytest.fixture(scope="session")
def templates(tmp_path_factory, small_models, docs_files) -> Templates:
    return Templates(tmp_path_factory.mktemp("hostile-templates"), small_models, docs_files)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _retarget_adapter(adapter: Path, base: Path) -> None:
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(config, indent=2))


# --------------------------------------------------------------------------------------------------- world
class World:
    """One case's folder: the command's inputs, a sentinel beside them and where the output goes."""

    def __init__(self, root: Path, t: Templates, command: str):
        self.root, self.t, self.command = root, t, command
        root.mkdir(parents=True, exist_ok=True)
        self.sentinel = root / "sentinel.txt"
        self.sentinel.write_text("a file of the user's beside the inputs: it must survive every command\n")
        self.overwrite = False
        self.extra: list[str] = []
        self.recipe: str | None = None  # YAML text of --config
        self.recipe_path: Path | None = None
        self.contexts: list[Callable] = []  # context managers entered around the run (mounts, chattr)
        self.fsize_limit: int | None = None
        self.online = command == "push-online"
        self.offline_mode = False
        self.repo = REPO
        if command in ("convert", "mix"):
            self.model = _copy(t.dense_sharded, root / "src")
        elif command == "materialize":
            self.model = _copy(t.shared, root / "shared")
        else:
            self.model = _copy(t.moe, root / "moe")
        self.adapter = None
        if command == "merge":
            self.adapter = _copy(t.lora, root / "run")
            _retarget_adapter(self.adapter, self.model)
        if command == "mix":  # two sources of one architecture, mixed as mergekit-moe's random gate does
            self.branch = _copy(t.dense_branch, root / "branch")
            self.recipe = yaml.safe_dump(self.mix_recipe(), sort_keys=False)
        self.push_folder = self.model
        if command.startswith("push"):  # no card yet: push renders one, and must not leave it behind on failure
            (self.model / "README.md").unlink(missing_ok=True)
        if command in ("train", "evaluate", "analyze"):
            self.train = root / "train.txt"
            self.valid = root / "valid.txt"
            self.train.write_text(t.train_text)
            self.valid.write_text(t.valid_text)
        if command in ("shrink", "quantize-auto"):  # --data: the text routed through the model (data_valid mutations)
            self.valid = root / "data.txt"
            self.valid.write_text(t.valid_text)
        self.dropped: set[str] = set()  # quantize-auto: its own flags left out of the command line
        self.out = {"convert": root / "out", "mix": root / "mixed", "materialize": root / "full", "shrink": root / "small",
                    "train": root / "trained", "merge": root / "merged", "evaluate": root / "eval.json",
                    "export": root / "native", "analyze": root / "routing", "quantize": root / "quantized",
                    "quantize-auto": root / "quantized"}.get(command)

    # inputs the mutations address
    def folder(self) -> Path:
        """The model folder the command reads (merge: the adapter's base; push: the pushed folder)."""
        return self.push_folder if self.command.startswith("push") else self.model

    def use_single_file(self) -> None:
        """Replace the model folder by the single-file (``model.safetensors``) layout of the same kind."""
        folder = self.folder()
        template = self.t.dense_single if self.command == "convert" else self.t.moe_single
        shutil.rmtree(folder)
        _copy(template, folder)
        if self.adapter is not None:
            _retarget_adapter(self.adapter, folder)

    def use_adapter_folder(self) -> Path:
        """push: push a LoRA adapter folder (whose base is the world's MoE) instead of the MoE."""
        if self.adapter is None:
            self.adapter = _copy(self.t.lora, self.root / "run")
            _retarget_adapter(self.adapter, self.model)
        self.push_folder = self.adapter
        return self.adapter

    def train_flags(self) -> dict:
        return {"model_name_or_path": str(self.model), "train_file": str(self.train), "validation_file": str(self.valid),
                "output_dir": str(self.out), "max_steps": 1, "block_size": 32, "per_device_train_batch_size": 2,
                "max_eval_samples": 4, "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
                "dataloader_pin_memory": False}

    def mix_recipe(self, **keys) -> dict:
        return {"gate_mode": "random", "experts_per_token": 2,
                "experts": [{"source_model": str(self.model)}, {"source_model": str(self.branch)}], **keys}

    def write_recipe(self) -> Path:
        self.recipe_path = self.recipe_path or self.root / "recipe.yaml"
        if self.recipe is not None and not self.recipe_path.exists():
            self.recipe_path.write_text(self.recipe)
        return self.recipe_path

    def argv(self) -> list[str]:
        c, ow = self.command, (["--overwrite"] if self.overwrite else [])
        if c == "convert":
            if self.recipe is not None or self.recipe_path is not None:
                return ["convert", "--config", self.write_recipe(), self.model, self.out, *ow, *self.extra]
            return ["convert", self.model, self.out, "--num-experts", "4", "--top-k", "2", *ow, *self.extra]
        if c == "mix":
            return ["mix", self.write_recipe(), self.out, *ow, *self.extra]
        if c == "materialize":
            return ["materialize", self.model, self.out, *ow, *self.extra]
        if c == "shrink":
            return ["shrink", self.model, self.out, "--num-experts", "2", "--data", self.valid, "--block-size", "16",
                    "--max-tokens", "64", *ow, *self.extra]
        if c == "train":
            if self.recipe is not None or self.recipe_path is not None:
                return ["train", "--config", self.write_recipe(), *self.extra]
            flags = []
            for key, value in self.train_flags().items():
                flags += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
            return ["train", *flags, *self.extra]
        if c == "merge":
            return ["merge", self.adapter, self.out, *ow, *self.extra]
        if c == "evaluate":
            return ["evaluate", self.model, "--validation_file", self.valid, "--block_size", "32", "--batch_size", "4",
                    "--max_eval_samples", "4", "--output_json", self.out, *self.extra]
        if c == "analyze":
            return ["analyze", self.model, "--data", f"docs={self.valid}", "--block_size", "32", "--batch_size", "4",
                    "--max_tokens", "128", "--output", self.out, *ow, *self.extra]
        if c == "push":
            return ["push", self.push_folder, self.repo, "--dry-run", *self.extra]
        if c == "push-online":
            return ["push", self.push_folder, self.repo, *self.extra]
        if c == "export":
            return ["export", self.model, self.out, *ow, *self.extra]
        if c == "quantize":
            return ["quantize", self.model, self.out, "--experts", "int4", *ow, *self.extra]
        if c == "quantize-auto":
            auto = [part for flag, value in (("--target-bits", "5"), ("--data", self.valid)) if flag not in self.dropped
                    for part in (flag, value)]
            return ["quantize", self.model, self.out, "--bits", "auto", *auto, "--block-size", "16", "--max-tokens", "64",
                    *ow, *self.extra]
        raise AssertionError(c)

    def hub_env(self) -> dict[str, str]:
        if not self.online:
            return {}
        return {"HF_ENDPOINT": UNREACHABLE, "HF_HUB_OFFLINE": "1" if self.offline_mode else "0", "HF_TOKEN": "hf_test_not_a_token",
                "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}

    def patch_hub(self, monkeypatch) -> None:
        if not self.online:
            return
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", self.offline_mode)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
        for name, value in self.hub_env().items():
            monkeypatch.setenv(name, value)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)


def run_world(world: World, capfd=None, monkeypatch=None, in_process: bool = True):
    """Hash the world, run the command, hash again: ``(before, after, outcome)``."""
    with ExitStack() as stack:
        for context in world.contexts:
            stack.enter_context(context())
        argv = world.argv()
        before = snapshot(world.root)
        if in_process:
            world.patch_hub(monkeypatch)
            with memory_limit(), file_size_limit(world.fsize_limit) if world.fsize_limit else nullcontext():
                outcome = run_inprocess(argv, capfd)
        else:
            outcome = run_subprocess(argv, env=cli_env(**world.hub_env()),
                                     preexec_fn=limit_memory_in_child(file_size=world.fsize_limit))
        after = snapshot(world.root)
    return before, after, outcome


def assert_clean_failure(world: World, before, after, outcome: Outcome) -> None:
    fresh = world.out if outcome.code == 0 and outcome.exc is None else None
    problems = failure_problems(outcome) + tree_problems(world.root, before, after, fresh=fresh)
    assert not problems, report(problems, outcome)


def report(problems: list[str], outcome: Outcome) -> str:
    """The problems on the first line (what ``pytest -rf`` shows), then the run."""
    return "; ".join(problems) + "\n" + outcome.describe()


# ----------------------------------------------------------------------------------------------- mutations
Mutation = Callable[[World], None]
GROUPS: dict[str, dict[str, Mutation]] = {}


def register(group: str, name: str, fn: Mutation) -> None:
    GROUPS.setdefault(group, {})[name] = fn


def _first_shard(world: World) -> Path:
    return weight_files(world.folder())[0]


def _edit_header(edit: Callable[[dict, bytes, Path], tuple]) -> Mutation:
    """A mutation of the first shard: ``edit(header, data, path)`` returns ``(header, data[, length])``."""

    def mutate(world: World, _target=None) -> None:
        path = _target or _first_shard(world)
        header, data = read_raw(path)
        write_raw(path, *edit(header, data, path))

    return mutate


def _entry(header: dict) -> dict:
    return header[first_tensor(header)]


def _set_entry_field(field: str, value) -> Callable:
    def edit(header, data, _path):
        _entry(header)[field] = value
        return header, data

    return edit


def _del_entry_field(field: str) -> Callable:
    def edit(header, data, _path):
        del _entry(header)[field]
        return header, data

    return edit


def _offsets(make: Callable[[int, int, int], list]) -> Callable:
    def edit(header, data, _path):
        begin, end = _entry(header)["data_offsets"]
        _entry(header)["data_offsets"] = make(begin, end, len(data))
        return header, data

    return edit


def _double_first_dim(header, data, _path):
    shape = _entry(header)["shape"]
    _entry(header)["shape"] = [shape[0] * 2, *shape[1:]] if shape else [2]
    return header, data


def _random_bytes(n: int) -> Mutation:
    def mutate(world: World, _target=None) -> None:
        (_target or _first_shard(world)).write_bytes(random.Random(n).randbytes(n))

    return mutate


def _truncate(where: str) -> Mutation:
    def mutate(world: World, _target=None) -> None:
        path = _target or _first_shard(world)
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        keep = {"in_length": 4, "in_header": 8 + length // 2, "last_byte": len(raw) - 1,
                "half_data": 8 + length + (len(raw) - 8 - length) // 2}[where]
        path.write_bytes(raw[:keep])

    return mutate


def _replace_shard(kind: str) -> Mutation:
    def mutate(world: World, _target=None) -> None:
        path = _target or _first_shard(world)
        path.unlink()
        if kind == "directory":
            path.mkdir()
            (path / "weights.bin").write_bytes(b"\0" * 64)
        elif kind == "symlink_loop":
            path.symlink_to(path.name)
        elif kind == "dangling_symlink":
            path.symlink_to(world.root / "nowhere.safetensors")

    return mutate


# Safetensors files: byte-level damage, headers of every wrong JSON type, wrong offsets, shapes and dtypes.
SHARD_MUTATIONS: dict[str, Mutation] = {
    **{f"random_bytes_{n}": _random_bytes(n) for n in (0, 7, 64, 4096)},
    **{f"truncated_{where}": _truncate(where) for where in ("in_length", "in_header", "last_byte", "half_data")},
    "header_json_list": _edit_header(lambda h, d, p: ([], d)),
    "header_list_of_entries": _edit_header(lambda h, d, p: ([v for k, v in h.items() if k != "__metadata__"], d)),
    "header_json_string": _edit_header(lambda h, d, p: ("weights", d)),
    "header_json_number": _edit_header(lambda h, d, p: (7, d)),
    "header_json_null": _edit_header(lambda h, d, p: (None, d)),
    "header_not_json": _edit_header(lambda h, d, p: (b"{this is not json}     ", d)),
    "header_not_utf8": _edit_header(lambda h, d, p: (b'{"\xff\xfe": 1}', d)),
    "header_length_huge": _edit_header(lambda h, d, p: (h, d, 2**63 + 5)),
    "header_length_zero": _edit_header(lambda h, d, p: (h, d, 0)),
    "metadata_list": _edit_header(lambda h, d, p: ({**h, "__metadata__": ["format", "pt"]}, d)),
    "entry_list": _edit_header(lambda h, d, p: ({**h, first_tensor(h): list(_entry(h).values())}, d)),
    "entry_string": _edit_header(lambda h, d, p: ({**h, first_tensor(h): "F32"}, d)),
    "entry_null": _edit_header(lambda h, d, p: ({**h, first_tensor(h): None}, d)),
    "entry_without_offsets": _edit_header(_del_entry_field("data_offsets")),
    "entry_without_dtype": _edit_header(_del_entry_field("dtype")),
    "dtype_unknown": _edit_header(_set_entry_field("dtype", "F99")),
    "dtype_number": _edit_header(_set_entry_field("dtype", 5)),
    "dtype_list": _edit_header(_set_entry_field("dtype", ["F32"])),
    "shape_string": _edit_header(_set_entry_field("shape", "64x32")),
    "shape_null": _edit_header(_set_entry_field("shape", None)),
    "shape_negative": _edit_header(_set_entry_field("shape", [-1, 8])),
    "shape_floats": _edit_header(_set_entry_field("shape", [1.5, 2.0])),
    "shape_nested": _edit_header(_set_entry_field("shape", [[8], [8]])),
    "shape_size_mismatch": _edit_header(_double_first_dim),
    "offsets_beyond_file": _edit_header(_offsets(lambda b, e, n: [b, n + 8])),
    "offsets_reversed": _edit_header(_offsets(lambda b, e, n: [e, b] if e > b else [b + 8, b])),
    "offsets_negative": _edit_header(_offsets(lambda b, e, n: [-8, e - b - 8])),
    "offsets_strings": _edit_header(_offsets(lambda b, e, n: [str(b), str(e)])),
    "offsets_three": _edit_header(_offsets(lambda b, e, n: [b, e, e])),
    "offsets_floats": _edit_header(_offsets(lambda b, e, n: [b + 0.5, e + 0.5])),
    "offsets_null": _edit_header(_offsets(lambda b, e, n: None)),
    "shard_is_directory": _replace_shard("directory"),
    "shard_symlink_loop": _replace_shard("symlink_loop"),
    "shard_dangling_symlink": _replace_shard("dangling_symlink"),
    "shard_missing": _replace_shard("missing"),
}
for _name, _fn in SHARD_MUTATIONS.items():
    register("weights", _name, _fn)


def _single_then(mutation: Mutation) -> Mutation:
    def mutate(world: World) -> None:
        world.use_single_file()
        mutation(world)

    return mutate


# The single-file layout: ``model.safetensors`` itself damaged, or a directory of that name.
for _name in ("header_json_list", "truncated_in_header", "random_bytes_64", "dtype_unknown", "offsets_beyond_file",
              "shard_is_directory", "shard_missing", "shape_size_mismatch"):
    register("weights_single", _name, _single_then(SHARD_MUTATIONS[_name]))


def _index_text(text: str) -> Mutation:
    def mutate(world: World) -> None:
        (world.folder() / INDEX).write_text(text)

    return mutate


def _index_edit(edit: Callable[[dict, World], dict]) -> Mutation:
    def mutate(world: World) -> None:
        path = world.folder() / INDEX
        path.write_text(json.dumps(edit(json.loads(path.read_text()), world)))

    return mutate


def _map_values(value_of: Callable[[str, World], object]) -> Callable:
    def edit(index, world):
        index["weight_map"] = {k: value_of(v, world) for k, v in index["weight_map"].items()}
        return index

    return edit


def _one_value(value_of: Callable[[str, World], object]) -> Callable:
    def edit(index, world):
        first = sorted(index["weight_map"])[0]
        index["weight_map"][first] = value_of(index["weight_map"][first], world)
        return index

    return edit


# model.safetensors.index.json: invalid JSON and every wrong JSON type where the loaders expect a map of names.
INDEX_MUTATIONS: dict[str, Mutation] = {
    "invalid_json": _index_text('{"weight_map": {"a": "b",'),
    "empty_file": _index_text(""),
    "json_list": _index_text("[]"),
    "json_null": _index_text("null"),
    "json_string": _index_text('"model-00001-of-00002.safetensors"'),
    "weight_map_missing": _index_edit(lambda i, w: {"metadata": i.get("metadata", {})}),
    "weight_map_list": _index_edit(lambda i, w: {**i, "weight_map": sorted(set(i["weight_map"].values()))}),
    "weight_map_null": _index_edit(lambda i, w: {**i, "weight_map": None}),
    "weight_map_string": _index_edit(lambda i, w: {**i, "weight_map": "model.safetensors"}),
    "weight_map_empty": _index_edit(lambda i, w: {**i, "weight_map": {}}),
    "weight_map_values_int": _index_edit(_map_values(lambda v, w: 1)),
    "weight_map_values_list": _index_edit(_map_values(lambda v, w: [v])),
    "weight_map_unknown_file": _index_edit(_one_value(lambda v, w: "model-99999-of-99999.safetensors")),
    "weight_map_path_traversal": _index_edit(_one_value(lambda v, w: "../sentinel.txt")),
    "weight_map_absolute_path": _index_edit(_one_value(lambda v, w: str(w.sentinel))),
    "weight_map_names_a_folder": _index_edit(_one_value(lambda v, w: ".")),
}
for _name, _fn in INDEX_MUTATIONS.items():
    register("index", _name, _fn)


def _config_text(text: str | None) -> Mutation:
    def mutate(world: World) -> None:
        path = world.folder() / "config.json"
        if text is None:
            path.unlink()
        else:
            path.write_text(text)

    return mutate


def _config_field(keys: tuple[str, ...], value) -> Mutation:
    def mutate(world: World) -> None:
        path = world.folder() / "config.json"
        config = json.loads(path.read_text())
        node = config
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        path.write_text(json.dumps(config, indent=2))

    return mutate


WRONG_INTS = {"string": "sixty-four", "list": [64], "null": None, "dict": {"value": 64}}
DENSE_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
MOE_FIELDS = {
    ("num_experts",): WRONG_INTS,
    ("num_experts_per_tok",): {"string": "two", "list": [2], "null": None},
    ("moe_layers",): {"string": "all", "ints_as_strings": ["0", "1"], "dict": {"0": 1}},
    ("router_type",): {"list": ["topk_renorm"], "number": 3, "unknown": "no_such_router"},
    ("text_config",): {"string": "llama", "list": [], "null": None},
    **{("text_config", f): {"string": "sixty-four", "list": [64], "null": None}
       for f in ("hidden_size", "num_hidden_layers", "vocab_size")},
}
CONFIG_FILE_MUTATIONS = {"invalid_json": '{"model_type": "llama",', "empty_file": "", "json_list": "[]", "json_null": "null",
                         "missing": None}
for _name, _text in CONFIG_FILE_MUTATIONS.items():
    register("config", _name, _config_text(_text))
for _field in DENSE_INT_FIELDS:
    for _kind, _value in WRONG_INTS.items():
        register("config_dense", f"{_field}_{_kind}", _config_field((_field,), _value))
for _kind, _value in {"number": 5, "null": None, "unknown": "no_such_family", "list": ["llama"]}.items():
    register("config_dense", f"model_type_{_kind}", _config_field(("model_type",), _value))
for _keys, _values in MOE_FIELDS.items():
    for _kind, _value in _values.items():
        register("config_moe", f"{'.'.join(_keys)}_{_kind}", _config_field(_keys, _value))
for _kind, _value in {"number": 5, "null": None, "dense_family": "llama"}.items():
    register("config_moe", f"model_type_{_kind}", _config_field(("model_type",), _value))


def _files(kind: str) -> Mutation:
    def mutate(world: World) -> None:
        folder = world.folder()
        if kind == "folder_missing":
            shutil.rmtree(folder)
        elif kind == "folder_is_file":
            shutil.rmtree(folder)
            folder.write_text("not a model folder\n")
        elif kind == "no_weights":
            for path in [*weight_files(folder), folder / INDEX]:
                path.unlink(missing_ok=True)
        elif kind == "tokenizer_missing":
            for base in {folder, world.adapter} - {None}:
                for name in TOKENIZER_FILES:
                    (base / name).unlink(missing_ok=True)
        elif kind == "tokenizer_invalid_json":
            for base in {folder, world.adapter} - {None}:
                if (base / "tokenizer.json").is_file():
                    (base / "tokenizer.json").write_text('{"version": "1.0", "model": ')
        else:
            raise AssertionError(kind)

    return mutate


for _kind in ("folder_missing", "folder_is_file", "no_weights"):
    register("files", _kind, _files(_kind))
for _kind in ("tokenizer_missing", "tokenizer_invalid_json"):
    register("tokenizer", _kind, _files(_kind))


# adapter_config.json of a LoRA folder (merge's input; push of an adapter folder)
def _adapter_text(text: str | None) -> Mutation:
    def mutate(world: World) -> None:
        adapter = world.use_adapter_folder() if world.command.startswith("push") else world.adapter
        path = adapter / "adapter_config.json"
        if text is None:
            path.unlink()
        else:
            path.write_text(text)

    return mutate


def _adapter_field(key: str, value) -> Mutation:
    def mutate(world: World) -> None:
        adapter = world.use_adapter_folder() if world.command.startswith("push") else world.adapter
        path = adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        config[key] = value(world) if callable(value) else value
        path.write_text(json.dumps(config, indent=2))

    return mutate


for _name, _text in {"invalid_json": '{"peft_type": "LORA",', "empty_file": "", "json_list": "[]", "json_null": "null",
                     "missing": None}.items():
    register("adapter_config", _name, _adapter_text(_text))
for _key, _values in {
    "base_model_name_or_path": {"number": 5, "list": ["moe"]},
    "r": {"string": "sixteen", "null": None, "list": [16]},
    "lora_alpha": {"string": "thirty-two", "list": [32]},
    "target_modules": {"number": 5, "dict": {"q_proj": 1}},
    "peft_type": {"unknown": "NOT_A_PEFT_TYPE", "null": None, "number": 1},
}.items():
    for _kind, _value in _values.items():
        register("adapter_config", f"{_key}_{_kind}", _adapter_field(_key, _value))
# merge only: an adapter without a usable base (push publishes the adapter; its base is the user's business)
for _kind, _value in {"null": None, "gone": lambda w: str(w.root / "gone"), "relative_gone": "demo_run/moe"}.items():
    register("adapter_base", f"base_model_name_or_path_{_kind}", _adapter_field("base_model_name_or_path", _value))


def _adapter_weights(name: str) -> Mutation:
    def mutate(world: World) -> None:
        adapter = world.use_adapter_folder() if world.command.startswith("push") else world.adapter
        SHARD_MUTATIONS[name](world, adapter / "adapter_model.safetensors")

    return mutate


for _name in ("random_bytes_64", "truncated_in_header", "truncated_half_data", "header_json_list", "dtype_unknown",
              "shape_size_mismatch", "offsets_beyond_file", "shard_is_directory", "shard_missing"):
    register("adapter_weights", _name, _adapter_weights(_name))


def _merge_base(kind: str) -> Mutation:
    def mutate(world: World) -> None:
        if kind == "base_missing":
            shutil.rmtree(world.model)
        elif kind == "base_is_dense":  # the adapter was trained on the MoE; its base folder now holds a dense model
            shutil.rmtree(world.model)
            _copy(world.t.small_dense, world.model)

    return mutate


register("merge_base", "base_missing", _merge_base("base_missing"))
register("merge_base", "base_is_dense", _merge_base("base_is_dense"))


# Data files of train (train_file, validation_file) and evaluate (validation_file).
def _data(slot: str, kind: str) -> Mutation:
    def mutate(world: World) -> None:
        path: Path = getattr(world, slot)
        other = "valid" if slot == "train" else "train"

        def retype(suffix: str, good: str) -> Path:  # both files must have the same type
            new = path.with_suffix(suffix)
            path.unlink()
            setattr(world, slot, new)
            if world.command == "train":
                old_other: Path = getattr(world, other)
                new_other = old_other.with_suffix(suffix)
                old_other.unlink()
                new_other.write_text(good)
                setattr(world, other, new_other)
            return new

        good_jsonl = "".join(json.dumps({"text": p}) + "\n" for p in world.t.valid_text.split("\n\n") if p.strip())
        if kind == "missing":
            path.unlink()
        elif kind == "empty":
            path.write_text("")
        elif kind == "blank_lines":
            path.write_text("\n\n   \n\n")
        elif kind == "shorter_than_a_block":
            path.write_text("Hi.")
        elif kind == "directory":
            path.unlink()
            path.mkdir()
        elif kind == "binary":
            path.write_bytes(random.Random(1).randbytes(3000))
        elif kind == "jsonl_malformed_line":
            lines = good_jsonl.splitlines()
            lines.insert(2, '{"text": "an unfinished record')
            retype(".jsonl", good_jsonl).write_text("\n".join(lines) + "\n")
        elif kind == "jsonl_wrong_column":
            retype(".jsonl", good_jsonl).write_text(good_jsonl.replace('"text"', '"content"'))
        elif kind == "jsonl_text_not_string":
            retype(".jsonl", good_jsonl).write_text("".join(json.dumps({"text": [i, i + 1]}) + "\n" for i in range(50)))
        elif kind == "json_scalar":
            retype(".json", good_jsonl).write_text("42\n")
        elif kind == "parquet_garbage":
            retype(".parquet", good_jsonl).write_text("this is not a parquet file\n" * 20)
        elif kind == "unsupported_type":
            retype(".csv", good_jsonl).write_text("text\nhello\n")
        else:
            raise AssertionError(kind)

    return mutate


DATA_KINDS = ("missing", "empty", "blank_lines", "shorter_than_a_block", "directory", "binary", "jsonl_malformed_line",
              "jsonl_wrong_column", "jsonl_text_not_string", "json_scalar", "parquet_garbage", "unsupported_type")
for _kind in DATA_KINDS:
    register("data_train", _kind, _data("train", _kind))
    register("data_valid", _kind, _data("valid", _kind))


# YAML recipes (--config) of convert and train: syntax errors, a document that is not a mapping, wrong value types.
YAML_SYNTAX = {
    "unclosed_flow": "num_experts: [4, 2\ntop_k: 2\n",
    "mapping_in_scalar": "num_experts: 4: 2\n",
    "tab_indent": "num_experts: 4\n\ttop_k: 2\n",
    "unterminated_quote": "num_experts: 4\nlayers: 'all\n",
    "bad_indent": "num_experts: 4\n  top_k: 2\n",
    "top_level_list": "- num_experts\n- 4\n",
    "top_level_scalar": "just some text\n",
}


def _recipe_text(text: str | bytes | None, kind: str = "text") -> Mutation:
    def mutate(world: World) -> None:
        world.recipe_path = world.root / "recipe.yaml"
        if kind == "missing":
            pass
        elif kind == "directory":
            world.recipe_path.mkdir()
        elif isinstance(text, bytes):
            world.recipe_path.write_bytes(text)
        else:
            world.recipe_path.write_text(text)

    return mutate


def _recipe_value(key: str, value, existing_output: bool = False) -> Mutation:
    def mutate(world: World) -> None:
        base = {"num_experts": 4, "top_k": 2} if world.command == "convert" else world.train_flags()
        world.recipe = yaml.safe_dump({**base, key: value}, sort_keys=False)
        if existing_output:
            _copy(world.t.ours, world.out)

    return mutate


CONVERT_WRONG_TYPES = {
    "overwrite": {"quoted_no": "no", "quoted_false": "false", "quoted_yes": "yes", "int": 1},
    "verify": {"quoted_no": "no", "quoted_yes": "yes", "int": 1},
    "shared_expert_gate": {"quoted_no": "no", "int": 1},
    "num_experts": {"true": True, "string": "four", "list": [4], "float": 4.5, "null": None},
    "top_k": {"true": True, "string": "two", "list": [2], "float": 2.5, "null": None},
    "granularity": {"true": True, "string": "one", "list": [1]},
    "shared_experts": {"true": True, "string": "none"},
    "seed": {"string": "zero", "list": [0], "float": 1.5},
    "layers": {"list_of_booleans": [True], "list_of_strings": ["zero"], "dict": {"every": 2}, "true": True},
    "router_type": {"list": ["sigmoid"], "true": True, "number": 5, "not_a_choice": "bogus"},
    "router_init": {"list": ["zero"], "false": False, "not_a_choice": "bogus"},
    "dtype": {"list": ["float32"], "true": True, "not_a_choice": "int8"},
    "max_shard_size": {"list": [1], "true": True},
    "expert_noise": {"string": "lots", "true": True, "list": [0.1]},
    "router_init_std": {"string": "small", "true": True},
    "router_aux_loss_coef": {"string": "x", "true": True, "list": [0.01]},
    "drop_upcycling": {"string": "half", "true": True},
}
TRAIN_WRONG_TYPES = {
    "use_lora": {"quoted_no": "no", "quoted_yes": "yes"},
    "routing_heatmap": {"quoted_no": "no"},
    "max_steps": {"true": True, "string": "ten", "list": [1], "float": 1.5},
    "block_size": {"true": True, "string": "big", "list": [32]},
    "per_device_train_batch_size": {"true": True, "string": "two"},
    "lora_r": {"true": True, "string": "sixteen"},
    "learning_rate": {"string": "fast", "true": True, "list": [0.001]},
    "router_aux_loss_coef": {"string": "x", "true": True},
    "lora_target": {"number": 5, "true": True},
    "text_column": {"list": ["text"], "number": 1},
    "model_name_or_path": {"list": ["moe"], "number": 5},
    "seed": {"string": "zero", "list": [0]},
}
for _command, _table in (("convert", CONVERT_WRONG_TYPES), ("train", TRAIN_WRONG_TYPES)):
    for _name, _text in YAML_SYNTAX.items():
        register(f"recipe_{_command}", f"syntax_{_name}", _recipe_text(_text))
    register(f"recipe_{_command}", "not_utf8", _recipe_text(b"num_experts: 4\n\xff\xfe\x00: 2\n"))
    register(f"recipe_{_command}", "file_missing", _recipe_text(None, "missing"))
    register(f"recipe_{_command}", "file_is_directory", _recipe_text(None, "directory"))
    for _key, _values in _table.items():
        for _kind, _value in _values.items():
            register(f"recipe_{_command}", f"{_key}_{_kind}",
                     _recipe_value(_key, _value, existing_output=_command == "convert" and _key == "overwrite"))


# mix: its recipe (mergekit-moe's YAML: syntax, wrong value types at the top and in an expert) and its second source.
def _mix_recipe_text(text: str | bytes | None, kind: str = "text") -> Mutation:
    write = _recipe_text(text, kind)

    def mutate(world: World) -> None:
        world.recipe = None  # the recipe file is what ``write`` leaves there, or nothing
        write(world)

    return mutate


def _mix_recipe_value(key: str, value, in_expert: bool = False) -> Mutation:
    def mutate(world: World) -> None:
        recipe = world.mix_recipe() if in_expert else world.mix_recipe(**{key: value})
        if in_expert:
            recipe["experts"][0][key] = value
        world.recipe = yaml.safe_dump(recipe, sort_keys=False)

    return mutate


MIX_WRONG_VALUES = {
    "experts_per_token": {"string": "two", "true": True, "zero": 0, "three_of_two": 3},
    "gate_mode": {"list": ["random"], "not_a_choice": "bogus"},
    "experts": {"string": "src", "empty": []},
    "base_model": {"number": 5},
    "nonexpert": {"list": ["base"]},
    "dtype": {"not_a_choice": "int8"},
    "layers": {"dict": {"every": 2}},
    "allow_identical_sources": {"quoted_no": "no"},
    "experts_per_tok": {"unknown_key": 2},
}
MIX_WRONG_EXPERT_VALUES = {"source_model": {"list": ["src"]}, "noise_scale": {"string": "lots", "false": False},
                           "copies": {"zero": 0, "float": 1.5}, "residual_scale": {"true": True},
                           "positive_prompts": {"with_random_gate": ["def f():"]}, "weight": {"unknown_key": 0.5}}
for _name in ("unclosed_flow", "top_level_list"):
    register("recipe_mix", f"syntax_{_name}", _mix_recipe_text(YAML_SYNTAX[_name]))
register("recipe_mix", "not_utf8", _mix_recipe_text(b"gate_mode: random\n\xff\xfe\x00: 2\n"))
register("recipe_mix", "file_missing", _mix_recipe_text(None, "missing"))
register("recipe_mix", "file_is_directory", _mix_recipe_text(None, "directory"))
for _in_expert, _table in ((False, MIX_WRONG_VALUES), (True, MIX_WRONG_EXPERT_VALUES)):
    for _key, _values in _table.items():
        for _kind, _value in _values.items():
            register("recipe_mix", f"{'expert_' if _in_expert else ''}{_key}_{_kind}",
                     _mix_recipe_value(_key, _value, _in_expert))


def _mix_source(kind: str) -> Mutation:
    def mutate(world: World) -> None:
        branch = world.branch
        if kind == "branch_missing":
            shutil.rmtree(branch)
        elif kind == "branch_is_file":
            shutil.rmtree(branch)
            branch.write_text("not a model folder\n")
        elif kind == "branch_identical":  # a copy of the first source: nothing to specialise, refused without the flag
            shutil.rmtree(branch)
            _copy(world.model, branch)
        elif kind == "branch_hidden_size":  # its weights disagree with its config too: the config is compared first
            config = json.loads((branch / "config.json").read_text())
            (branch / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
        elif kind in SHARD_MUTATIONS:  # the second source's first shard
            SHARD_MUTATIONS[kind](world, weight_files(branch)[0])
        elif kind == "output_is_branch":
            world.out, world.overwrite = branch, True
        else:
            raise AssertionError(kind)

    return mutate


for _kind in ("branch_missing", "branch_is_file", "branch_identical", "branch_hidden_size", "header_json_list",
              "shape_size_mismatch", "output_is_branch"):
    register("mix_sources", _kind, _mix_source(_kind))


# materialize: a config that does not describe the shared-weight experts its weights hold, LoRA factors of the wrong
# shape or missing (the fold multiplies them as they are), a folder of full experts or a dense one; shrink: a folder
# of shared-weight experts (materialize them first) or a dense one.
for _keys, _values in {("expert_sharing",): {"none": "none"},
                       ("expert_lora_rank",): {"mismatch": 8, "string": "four"},
                       ("expert_lora_alpha",): {"null": None},
                       ("expert_lora_targets",): {"down_only": ["down"], "unknown": "bogus"}}.items():
    for _kind, _value in _values.items():
        register("config_lora", f"{'.'.join(_keys)}_{_kind}", _config_field(_keys, _value))

LORA_RESHAPES = {  # A [E, r, in], B [E, out, r]
    "A_rank_plus_one": lambda t: torch.cat([t, t[:, :1]], dim=1),
    "A_one_expert_less": lambda t: t[:-1],
    "A_flat": lambda t: t.reshape(-1),
    "B_out_plus_one": lambda t: torch.cat([t, t[:, :1]], dim=1),
}


def _first_tensor(suffix: str, rewrite: Callable[[torch.Tensor], torch.Tensor] | None) -> Mutation:
    """The first tensor (in name order) whose name ends with ``suffix`` rewritten in place by ``rewrite`` (a well-formed
    file whose tensor does not fit the config, or cannot be used as it is), or with ``rewrite=None`` removed from its
    shard and the index."""

    def mutate(world: World) -> None:
        folder = world.folder()
        index = json.loads((folder / INDEX).read_text())
        key = sorted(k for k in index["weight_map"] if k.endswith(suffix))[0]
        shard = folder / index["weight_map"][key]
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(shard)
        tensor = tensors.pop(key)
        if rewrite is None:
            del index["weight_map"][key]
            (folder / INDEX).write_text(json.dumps(index))
        else:
            tensors[key] = rewrite(tensor).contiguous()
        save_file(tensors, shard, metadata=metadata)

    return mutate


# The first MoE layer's LoRA factor of the up projection with another shape, or missing.
for _kind, _rewrite in {**LORA_RESHAPES, "B_missing": None}.items():
    register("lora_factors", _kind, _first_tensor(f".up_lora_{_kind[0]}", _rewrite))


def _replace_model(template: str) -> Mutation:
    def mutate(world: World) -> None:
        shutil.rmtree(world.model)
        _copy(getattr(world.t, template), world.model)

    return mutate


register("materialize_source", "full_experts", _replace_model("moe"))
register("materialize_source", "dense_folder", _replace_model("small_dense"))
register("shrink_source", "shared_experts", _replace_model("shared"))
register("shrink_source", "dense_folder", _replace_model("small_dense"))
# quantize: a dense folder, shared-weight experts (materialize them first), experts quantised already; export: a
# quantised folder (native classes hold float experts: refused without --dequantize).
register("quantize_source", "dense_folder", _replace_model("small_dense"))
register("quantize_source", "shared_experts", _replace_model("shared"))
register("quantize_source", "quantized", _replace_model("quantized"))
register("export_source", "quantized", _replace_model("quantized"))


def _poisoned(value: float) -> Callable:
    def rewrite(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[1, 2, 3] = value
        return t

    return rewrite


EXPERT_REWRITES = {
    "nan": _poisoned(float("nan")), "inf": _poisoned(float("inf")),
    "flattened": lambda t: t.reshape(-1, t.shape[-1]),  # [E * out, in]: the same bytes, one dimension less
    "extra_dim": lambda t: t[None],
    "transposed": lambda t: t.reshape(t.shape[0], t.shape[2], t.shape[1]),
    "one_expert_less": lambda t: t[:-1],
    "int32": lambda t: (t * 1000).to(torch.int32),
}
# The first MoE layer's down_proj experts [E, out, in] that do not fit the config or cannot be quantised, or missing.
for _kind, _rewrite in {**EXPERT_REWRITES, "missing": None}.items():
    register("expert_tensors", _kind, _first_tensor(".experts.down_proj", _rewrite))
# A config.json of the right types that does not describe the experts the weights hold.
for _keys, _values in {("num_experts",): {"more_than_weights": 8, "fewer_than_weights": 2},
                       ("expert_precision",): {"string": "int8", "unknown_scheme": {"0": ["int3"] * 4}},
                       ("expert_group_size",): {"odd": 7}}.items():
    for _kind, _value in _values.items():
        register("config_quantize", f"{'.'.join(_keys)}_{_kind}", _config_field(_keys, _value))


# Outputs: the input itself, inside or around an input, a file, under a file, unwritable, too long, full disk.
def _output(kind: str) -> Mutation:
    def mutate(world: World) -> None:
        w, root = world, world.root
        if kind == "is_input":
            w.out, w.overwrite = w.model, True
        elif kind == "is_input_no_overwrite":
            w.out = w.model
        elif kind == "is_adapter":  # merge RUN RUN --overwrite
            w.out, w.overwrite = w.adapter, True
        elif kind == "inside_input":  # an earlier output of ours stored inside the input folder
            w.out, w.overwrite = w.model / "old", True
            _copy(w.t.ours, w.out)
        elif kind == "contains_input":
            w.out, w.overwrite = root, True
        elif kind == "contains_input_project":  # convert PROJECT/src PROJECT --overwrite with a file beside src
            project = root / "project"
            project.mkdir()
            (project / "notes.txt").write_text("the user's notes\n")
            moved = project / w.model.name
            w.model.rename(moved)
            if w.adapter is not None:
                _retarget_adapter(w.adapter, moved)
            if w.push_folder == w.model:
                w.push_folder = moved
            w.model, w.out, w.overwrite = moved, project, True
        elif kind == "is_file":
            w.out = w.sentinel
        elif kind == "is_file_overwrite":
            w.out, w.overwrite = w.sentinel, True
        elif kind == "under_file":
            w.out = w.sentinel / "out"
        elif kind == "exists_foreign_overwrite":  # not written by moe-upcycle: --overwrite must refuse
            w.out.mkdir()
            (w.out / "thesis.tex").write_text("years of work\n")
            w.overwrite = True
        elif kind == "exists_ours_no_overwrite":
            _copy(w.t.ours, w.out)
        elif kind == "is_directory":  # evaluate --output_json DIR
            w.out.mkdir()
        elif kind == "missing_folder":  # evaluate --output_json into a folder that does not exist
            w.out = root / "no_such_folder" / "eval.json"
        elif kind == "is_validation_file":
            w.out = w.valid
        elif kind == "is_model_config":
            w.out = w.model / "config.json"
        elif kind == "name_too_long":
            w.out = root / ("x" * 300)
        elif kind == "parent_immutable":  # chattr +i stops root too
            locked = root / "locked"
            locked.mkdir()
            w.out = locked / w.out.name
            w.contexts.append(lambda: immutable(locked))
        elif kind == "read_only_fs":
            mount = root / "rofs"
            mount.mkdir()
            w.out = mount / w.out.name
            w.contexts.append(lambda: tmpfs(mount, read_only=True))
        elif kind == "disk_full":
            mount = root / "small"
            mount.mkdir()
            w.out = mount / w.out.name
            w.contexts.append(lambda: tmpfs(mount, size="16k"))
        elif kind == "file_size_limit":
            w.fsize_limit = 64 * 1024
        else:
            raise AssertionError(kind)

    return mutate


FOLDER_OUTPUT_KINDS = ("is_input", "is_input_no_overwrite", "inside_input", "contains_input", "contains_input_project",
                       "is_file", "is_file_overwrite", "under_file", "exists_foreign_overwrite", "exists_ours_no_overwrite",
                       "name_too_long", "parent_immutable", "read_only_fs", "disk_full", "file_size_limit")
OUTPUT_KINDS = {
    "convert": FOLDER_OUTPUT_KINDS,
    "mix": ("is_input", "is_input_no_overwrite", "inside_input", "contains_input", "is_file", "under_file",
            "exists_foreign_overwrite", "exists_ours_no_overwrite", "name_too_long", "disk_full"),
    "materialize": ("is_input", "is_input_no_overwrite", "inside_input", "contains_input", "is_file", "under_file",
                    "exists_foreign_overwrite", "exists_ours_no_overwrite", "name_too_long", "disk_full",
                    "file_size_limit"),
    "shrink": ("is_input", "inside_input", "contains_input", "is_file", "under_file", "exists_foreign_overwrite",
               "exists_ours_no_overwrite", "is_validation_file", "disk_full"),
    "export": FOLDER_OUTPUT_KINDS,
    "quantize": FOLDER_OUTPUT_KINDS,
    "quantize-auto": ("is_input", "inside_input", "contains_input", "is_file", "under_file", "exists_foreign_overwrite",
                      "exists_ours_no_overwrite", "is_validation_file", "disk_full"),
    "merge": (*FOLDER_OUTPUT_KINDS, "is_adapter"),
    "train": ("is_input", "contains_input", "contains_input_project", "is_file", "under_file", "name_too_long",
              "parent_immutable", "read_only_fs", "disk_full"),
    "evaluate": ("is_directory", "missing_folder", "is_validation_file", "is_model_config", "under_file", "name_too_long",
                 "parent_immutable", "read_only_fs"),
    "analyze": ("is_input", "inside_input", "contains_input", "is_file", "under_file", "exists_foreign_overwrite",
                "exists_ours_no_overwrite", "name_too_long", "read_only_fs"),
}
for _command, _kinds in OUTPUT_KINDS.items():
    for _kind in _kinds:
        register(f"output_{_command}", _kind, _output(_kind))


def _flags(*flags: str) -> Mutation:
    def mutate(world: World) -> None:
        world.extra += [f.replace("{root}", str(world.root)) for f in flags]

    return mutate


FLAGS = {
    "convert": {"num_experts_0": ["--num-experts", "0"], "num_experts_negative": ["--num-experts", "-4"],
                "top_k_0": ["--top-k", "0"], "granularity_0": ["--granularity", "0"],
                "shared_experts_all": ["--granularity", "2", "--shared-experts", "2"],
                "max_shard_size_junk": ["--max-shard-size", "lots"], "max_shard_size_0": ["--max-shard-size", "0"],
                "router_aux_loss_coef_inf": ["--router-aux-loss-coef", "inf"],
                "router_aux_loss_coef_nan": ["--router-aux-loss-coef", "nan"],
                "router_init_std_negative": ["--router-init-std", "-1"], "expert_noise_negative": ["--expert-noise", "-0.5"],
                "drop_upcycling_2": ["--drop-upcycling", "2"], "layers_empty": ["--layers", ""],
                "router_prompts_missing": ["--router-init", "hidden", "--router-prompts", "{root}/no_prompts.yaml"]},
    "train": {"max_steps_0": ["--max_steps", "0"], "router_aux_loss_coef_inf": ["--router_aux_loss_coef", "inf"],
              "router_aux_loss_coef_nan": ["--router_aux_loss_coef", "nan"],
              "lora_target_empty": ["--use_lora", "--lora_target", ""], "block_size_1": ["--block_size", "1"],
              "batch_size_0": ["--per_device_train_batch_size", "0"],
              "resume_from_nowhere": ["--resume_from_checkpoint", "{root}/no_checkpoint"],
              "resume_true_without_checkpoint": ["--resume_from_checkpoint", "true"],
              "unknown_flag": ["--no_such_flag", "1"]},
    "evaluate": {"batch_size_0": ["--batch_size", "0"], "batch_size_negative": ["--batch_size", "-2"],
                 "block_size_0": ["--block_size", "0"], "block_size_1": ["--block_size", "1"],
                 "max_eval_samples_0": ["--max_eval_samples", "0"], "text_column_missing": ["--text_column", "nope"]},
    "materialize": {"max_shard_size_junk": ["--max-shard-size", "lots"], "max_shard_size_0": ["--max-shard-size", "0"],
                    "unknown_flag": ["--num-experts", "2"]},
    "shrink": {"num_experts_0": ["--num-experts", "0"], "num_experts_more_than_model": ["--num-experts", "5"],
               "num_experts_not_int": ["--num-experts", "two"], "method_unknown": ["--method", "average"],
               "block_size_0": ["--block-size", "0"], "block_size_1": ["--block-size", "1"],
               "max_tokens_below_block": ["--max-tokens", "8"], "max_shard_size_junk": ["--max-shard-size", "lots"],
               "data_is_model": ["--data", "{root}/moe"]},
    "export": {"max_shard_size_junk": ["--max-shard-size", "lots"], "max_shard_size_0": ["--max-shard-size", "0"],
               "to_other_family": ["--to", "qwen2_moe"], "to_unknown": ["--to", "nope"]},
    "quantize": {"group_size_0": ["--group-size", "0"], "group_size_negative": ["--group-size", "-64"],
                 "group_size_odd": ["--group-size", "7"], "group_size_not_dividing": ["--group-size", "48"],
                 "group_size_huge": ["--group-size", str(2**64)], "group_size_not_int": ["--group-size", "sixty-four"],
                 "int8_group_size_odd": ["--experts", "int8", "--group-size", "7"],
                 "int2_group_size_not_dividing": ["--experts", "int2", "--group-size", "48"],
                 "experts_unknown": ["--experts", "int3"], "bits_unknown": ["--bits", "mixed"],
                 "target_bits_without_auto": ["--target-bits", "5"],
                 "data_without_auto": ["--data", "{root}/sentinel.txt"],
                 "auto_with_experts": ["--bits", "auto", "--target-bits", "5", "--data", "{root}/sentinel.txt"],
                 "max_shard_size_junk": ["--max-shard-size", "lots"], "max_shard_size_0": ["--max-shard-size", "0"]},
    "quantize-auto": {"target_bits_0": ["--target-bits", "0"], "target_bits_negative": ["--target-bits", "-5"],
                      "target_bits_nan": ["--target-bits", "nan"], "target_bits_inf": ["--target-bits", "inf"],
                      "target_bits_above_32": ["--target-bits", "33"],
                      "target_bits_below_cheapest": ["--target-bits", "2"],  # int2 with a scale per 64 columns: 2.5
                      "target_bits_tiny": ["--target-bits", "1e-300"], "target_bits_text": ["--target-bits", "five"],
                      "experts_with_auto": ["--experts", "int8"], "group_size_0": ["--group-size", "0"],
                      "group_size_odd": ["--group-size", "7"], "group_size_not_dividing": ["--group-size", "48"],
                      "group_size_huge": ["--group-size", str(2**64)], "block_size_0": ["--block-size", "0"],
                      "block_size_1": ["--block-size", "1"], "max_tokens_0": ["--max-tokens", "0"],
                      "max_tokens_negative": ["--max-tokens", "-64"], "max_tokens_below_block": ["--max-tokens", "8"],
                      "data_is_model": ["--data", "{root}/moe"], "data_is_output": ["--data", "{root}/quantized"]},
    "analyze": {"batch_size_0": ["--batch_size", "0"], "block_size_0": ["--block_size", "0"],
                "block_size_1": ["--block_size", "1"], "max_tokens_below_block": ["--max_tokens", "8"],
                "data_without_name": ["--data", "{root}/train.txt"], "data_name_twice": ["--data", "docs={root}/train.txt"],
                "text_column_missing": ["--text_column", "nope"]},
}
for _command, _table in FLAGS.items():
    for _name, _flagset in _table.items():
        register(f"flags_{_command}", _name, _flags(*_flagset))

REPO_IDS = {"repo_without_namespace": "tiny-moe", "repo_three_parts": "a/b/c", "repo_traversal": "../tiny-moe",
            "repo_empty": "", "repo_with_space": "test-user/tiny moe"}


def _push(kind: str) -> Mutation:
    def mutate(world: World) -> None:
        if kind in REPO_IDS:
            world.repo = REPO_IDS[kind]
        elif kind == "readme_broken_front_matter":
            (world.push_folder / "README.md").write_text("---\nlicense: [apache-2.0\ntags: {moe\n---\n# A model\n")
        elif kind == "readme_not_utf8":
            (world.push_folder / "README.md").write_bytes(b"---\nlicense: apache-2.0\n---\n\xff\xfe bad bytes\n")
        elif kind == "dense_folder":
            shutil.rmtree(world.push_folder)
            _copy(world.t.small_dense, world.push_folder)
        elif kind == "offline_mode":
            world.offline_mode = True
        else:
            raise AssertionError(kind)

    return mutate


for _kind in (*REPO_IDS, "readme_broken_front_matter", "readme_not_utf8", "dense_folder"):
    register("push", _kind, _push(_kind))
register("push_online", "offline_mode", _push("offline_mode"))


def _drop(flag: str) -> Mutation:
    def mutate(world: World) -> None:
        world.dropped.add(flag)

    return mutate


register("quantize_auto_flags", "data_missing", _drop("--data"))
register("quantize_auto_flags", "target_bits_missing", _drop("--target-bits"))

# Which mutation families apply to which subcommand.
APPLIES: dict[str, tuple[str, ...]] = {
    "convert": ("weights", "weights_single", "index", "config", "config_dense", "files", "recipe_convert",
                "output_convert", "flags_convert"),
    "mix": ("weights", "index", "config", "files", "recipe_mix", "mix_sources", "output_mix"),
    "materialize": ("weights", "index", "config", "config_moe", "config_lora", "lora_factors", "files",
                    "materialize_source", "output_materialize", "flags_materialize"),
    "shrink": ("weights", "index", "config", "config_moe", "files", "tokenizer", "data_valid", "shrink_source",
               "output_shrink", "flags_shrink"),
    "train": ("weights", "index", "config", "config_moe", "files", "tokenizer", "data_train", "data_valid", "recipe_train",
              "output_train", "flags_train"),
    "merge": ("weights", "index", "config", "config_moe", "files", "tokenizer", "adapter_config", "adapter_base",
              "adapter_weights", "merge_base", "output_merge"),
    "evaluate": ("weights", "index", "config", "config_moe", "files", "tokenizer", "data_valid", "output_evaluate",
                 "flags_evaluate"),
    "push": ("weights", "weights_single", "index", "config", "config_moe", "files", "adapter_config", "adapter_weights",
             "push"),
    "push-online": ("weights", "index", "config", "config_moe", "files", "adapter_config", "push", "push_online"),
    "export": ("weights", "weights_single", "index", "config", "config_moe", "files", "export_source", "output_export",
               "flags_export"),
    "quantize": ("weights", "weights_single", "index", "config", "config_moe", "config_quantize", "files",
                 "expert_tensors", "quantize_source", "output_quantize", "flags_quantize"),
    "quantize-auto": ("weights", "index", "config", "config_moe", "config_quantize", "files", "tokenizer",
                      "expert_tensors", "data_valid", "quantize_source", "output_quantize-auto", "flags_quantize-auto",
                      "quantize_auto_flags"),
    "analyze": ("weights", "index", "config", "config_moe", "files", "tokenizer", "data_valid", "output_analyze",
                "flags_analyze"),
}
# A command whose every case costs seconds (a model load through Transformers, datasets) runs these shard mutations
# only: one per failure mode of the reader (bytes, truncation, header type, offsets, dtype, shape, file kind).
CORE_SHARD = ("random_bytes_64", "truncated_in_header", "truncated_half_data", "header_json_list", "header_length_huge",
              "entry_null", "dtype_unknown", "shape_string", "shape_size_mismatch", "offsets_beyond_file",
              "offsets_strings", "shard_is_directory", "shard_missing")
CORE_INDEX = ("invalid_json", "json_list", "weight_map_list", "weight_map_missing", "weight_map_values_int",
              "weight_map_unknown_file", "weight_map_path_traversal")
EXPENSIVE = {"train", "merge", "evaluate", "analyze", "shrink", "quantize-auto"}
# One wrong value of each MoE config field, for the newer commands that read an upcycled config.json.
CORE_CONFIG_MOE = ("num_experts_string", "num_experts_per_tok_null", "moe_layers_string", "router_type_unknown",
                   "text_config_null", "text_config.hidden_size_string", "model_type_dense_family")
# mix reads its sources with convert's reader (every shard and index mutation runs there): a few of each here.
SUBSETS = {**{command: {"weights": CORE_SHARD, "index": CORE_INDEX} for command in EXPENSIVE},
           "mix": {"weights": ("random_bytes_64", "truncated_half_data", "header_json_list", "shape_size_mismatch",
                               "shard_missing"),
                   "index": ("invalid_json", "weight_map_unknown_file", "weight_map_path_traversal")},
           # materialize reads with convert's reader too: the core of each family, its own LoRA families in full.
           "materialize": {"weights": CORE_SHARD, "index": CORE_INDEX, "config_moe": CORE_CONFIG_MOE}}
# shrink routes --data as analyze does (every data mutation runs there): a few here.
SUBSETS["shrink"] |= {"config_moe": CORE_CONFIG_MOE,
                      "data_valid": ("missing", "shorter_than_a_block", "directory", "binary", "jsonl_wrong_column")}
# quantize --bits auto reads as quantize does (every family runs there) and routes --data as shrink does: the core of
# each, its own options in full.
SUBSETS["quantize-auto"] |= {"config_moe": CORE_CONFIG_MOE, "config_quantize": ("num_experts_more_than_weights",),
                             "expert_tensors": ("nan", "flattened"),
                             "data_valid": ("missing", "empty", "shorter_than_a_block", "directory", "binary",
                                            "jsonl_wrong_column")}


def _cases() -> list:
    cases = []
    for command in COMMANDS:
        for group in APPLIES[command]:
            for name in GROUPS[group]:
                if name not in SUBSETS.get(command, {}).get(group, (name,)):
                    continue
                cases.append(pytest.param(command, group, name, id=f"{command}-{group}-{name}"))
    return cases


CASES = _cases()


def build_world(tmp_path: Path, templates: Templates, command: str, group: str | None = None, name: str | None = None) -> World:
    world = World(tmp_path / "world", templates, command)
    if group is not None:
        GROUPS[group][name](world)
    return world


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("command", COMMANDS)
def test_baseline_writes_only_its_fresh_output(command, templates, tmp_path, capfd, monkeypatch):
    """The unmutated world: the command succeeds and the only new path is its output (push-online: the Hub is
    unreachable, so it fails with one line and changes nothing, README.md included)."""
    world = build_world(tmp_path, templates, command)
    before, after, outcome = run_world(world, capfd, monkeypatch)
    if command == "push-online":
        assert_clean_failure(world, before, after, outcome)
        return
    problems = success_problems(outcome) + tree_problems(world.root, before, after, fresh=world.out)
    assert not problems, report(problems, outcome)
    if world.out is not None:
        assert world.out.exists()


@pytest.mark.parametrize(("command", "group", "name"), CASES)
def test_bad_input_fails_cleanly_and_changes_nothing(command, group, name, templates, tmp_path, capfd, monkeypatch):
    world = build_world(tmp_path, templates, command, group, name)
    before, after, outcome = run_world(world, capfd, monkeypatch)
    assert_clean_failure(world, before, after, outcome)


SUBPROCESS_SUBSET = (
    "convert-weights-header_json_list", "convert-recipe_convert-overwrite_quoted_no", "convert-output_convert-is_input",
    "convert-output_convert-file_size_limit", "mix-recipe_mix-syntax_unclosed_flow", "mix-mix_sources-branch_hidden_size",
    "train-output_train-is_input",
    "train-data_train-parquet_garbage", "merge-adapter_config-peft_type_unknown", "evaluate-config_moe-num_experts_string",
    "push-online-push_online-offline_mode", "export-output_export-is_input", "export-config_moe-text_config.hidden_size_string",
    "analyze-data_valid-binary", "materialize-lora_factors-A_rank_plus_one", "shrink-flags_shrink-num_experts_more_than_model",
    "quantize-output_quantize-is_input", "quantize-expert_tensors-nan", "quantize-quantize_source-quantized",
    "quantize-auto-flags_quantize-auto-target_bits_below_cheapest", "quantize-auto-data_valid-binary",
    "export-export_source-quantized",
)
_BY_ID = {case.id: case.values for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_SUBSET)
def test_subprocess_subset(case_id, templates, tmp_path):
    """A representative subset as real processes: what a user's shell sees (logging at exit, real tracebacks, the
    file-size limit of a real process)."""
    command, group, name = _BY_ID[case_id]
    world = build_world(tmp_path, templates, command, group, name)
    before, after, outcome = run_world(world, in_process=False)
    assert_clean_failure(world, before, after, outcome)


@pytest.mark.slow
def test_subprocess_push_to_unreachable_endpoint(templates, tmp_path):
    world = build_world(tmp_path, templates, "push-online")
    before, after, outcome = run_world(world, in_process=False)
    assert_clean_failure(world, before, after, outcome)


def test_case_table_covers_every_subcommand():
    """Every subcommand gets generated cases from every family that applies to it (the counts are in the report)."""
    counts = {command: sum(1 for case in CASES if case.values[0] == command) for command in COMMANDS}
    assert all(count >= 40 for count in counts.values()), counts
    assert set(SUBPROCESS_SUBSET) <= set(_BY_ID)


# ------------------------------------------------------------------------------------- generated (hypothesis)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class _Counter:
    n = 0


def _fuzz_world(tmp_path: Path, templates: Templates, command: str = "convert") -> World:
    _Counter.n += 1
    return World(tmp_path / f"example{_Counter.n}", templates, command)


def _check_either_way(world: World, before, after, outcome: Outcome, must_fail: bool = False) -> None:
    """Success writes only the fresh output; failure is one clean line and writes nothing."""
    succeeded = outcome.code == 0 and outcome.exc is None
    if succeeded and not must_fail:
        problems = tree_problems(world.root, before, after, fresh=world.out)
    else:
        problems = failure_problems(outcome) + tree_problems(world.root, before, after)
    assert not problems, report(problems, outcome)
    shutil.rmtree(world.root, ignore_errors=True)


@FUZZ
@given(where=st.sampled_from(["whole", "metadata", "entry", "dtype", "shape", "data_offsets"]), value=JSON_VALUES)
def test_generated_header_values(where, value, templates, tmp_path, capfd, monkeypatch):
    """Any JSON value in any place of a shard header: a clean failure, or a success that wrote only the output."""
    world = _fuzz_world(tmp_path, templates)
    path = _first_shard(world)
    header, data = read_raw(path)
    if where == "whole":
        header = value
    elif where == "metadata":
        header["__metadata__"] = value
    elif where == "entry":
        header[first_tensor(header)] = value
    else:
        _entry(header)[where] = value
    write_raw(path, header, data)
    before, after, outcome = run_world(world, capfd, monkeypatch)
    _check_either_way(world, before, after, outcome)


@FUZZ
@given(data=st.data(), value=JSON_VALUES)
def test_generated_config_values(data, value, templates, tmp_path, capfd, monkeypatch):
    """Any JSON value for any field of the source's config.json: a clean failure, or a success."""
    world = _fuzz_world(tmp_path, templates)
    path = world.model / "config.json"
    config = json.loads(path.read_text())
    key = data.draw(st.sampled_from(sorted(config)), label="key")
    config[key] = value
    path.write_text(json.dumps(config))
    before, after, outcome = run_world(world, capfd, monkeypatch)
    _check_either_way(world, before, after, outcome)


RECIPE_TYPES = {"num_experts": int, "top_k": int, "granularity": int, "shared_experts": int, "seed": int,
                "overwrite": bool, "verify": bool, "shared_expert_gate": bool, "layers": str, "router_type": str,
                "router_init": str, "dtype": str, "max_shard_size": str, "expert_noise": float,
                "router_init_std": float, "router_aux_loss_coef": float, "router_z_loss_coef": float,
                "router_jitter_noise": float, "drop_upcycling": float}


def _right_type(value, expected: type, key: str = "") -> bool:
    if key == "layers" and isinstance(value, list):  # the API's list of layer indices
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


@FUZZ
@given(key=st.sampled_from(sorted(RECIPE_TYPES)), value=JSON_VALUES)
def test_generated_recipe_values(key, value, templates, tmp_path, capfd, monkeypatch):
    """A convert recipe with any YAML value for a key: a value of the wrong type (a string for a boolean, a boolean
    for an integer, a list for a string, null) must fail cleanly; any value may not damage anything."""
    world = _fuzz_world(tmp_path, templates)
    recipe = {"num_experts": 4, "top_k": 2, key: value}
    world.recipe = yaml.safe_dump(recipe)
    before, after, outcome = run_world(world, capfd, monkeypatch)
    _check_either_way(world, before, after, outcome, must_fail=not _right_type(value, RECIPE_TYPES[key], key))
