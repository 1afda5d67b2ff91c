"""Training vision-language MoE models on image-text data (issue 15, point 3): the drawn image-caption data set
(coloured shapes on a plain background, captions naming colour and shape), full fine-tuning and LoRA through
``moe-upcycle train``, the vision tower frozen, and bad data refused in one line."""

from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import moe_upcycle
from moe_upcycle.cli import main
from moe_upcycle.train import run_training

from .vlm_families import build_vlm

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
COMMON = ["--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no", "--per_device_train_batch_size", "8",
          "--per_device_eval_batch_size", "8", "--seed", "0", "--dataloader_pin_memory", "false", "--disable_tqdm", "true"]


def draw(colour: str, shape: str, size: int = 32) -> Image.Image:
    """A filled ``shape`` of ``colour`` on a white background."""
    image = Image.new("RGB", (size, size), "white")
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    pen = ImageDraw.Draw(image)
    if shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "circle":
        pen.ellipse(box, fill=colour)
    else:
        pen.polygon([(box[0], box[3]), (box[2], box[3]), (size // 2, box[1])], fill=colour)
    return image


def shapes_data(folder, rows: int = 36, conversation: bool = False, seed: int = 0) -> list[dict]:
    """``rows`` drawn images under ``folder/images`` and their caption rows (relative image paths)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        draw(colour, shape).save(folder / "images" / f"{seed}_{i}.png")
        caption = f"a {colour} {shape}"
        row = {"image": f"images/{seed}_{i}.png"}
        if conversation:
            row["messages"] = [{"role": "user", "content": "what is this ?"}, {"role": "assistant", "content": caption}]
        else:
            row["text"] = caption
        out.append(row)
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def vlm_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vlm_train")
    dense = build_vlm("llava", folder / "dense")
    moe_upcycle.upcycle(dense, folder / "moe", num_experts=4, top_k=2, layers="every:2")
    train = write_jsonl(folder / "train.jsonl", shapes_data(folder, 48))
    valid = write_jsonl(folder / "valid.jsonl", shapes_data(folder, 16, seed=1))
    return folder / "moe", train, valid


def _train(model, train, valid, out, *extra):
    return run_training(["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file",
                         str(valid), "--output_dir", str(out), *COMMON, *extra])


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_full_fine_tuning_lowers_held_out_loss_and_keeps_the_vision_tower(vlm_moe, tmp_path):
    moe, train, valid = vlm_moe
    before = _train(moe, train, valid, tmp_path / "zero", "--max_steps", "1", "--learning_rate", "1e-12")
    metrics = _train(moe, train, valid, tmp_path / "run", "--max_steps", "30", "--learning_rate", "3e-3",
                     "--logging_steps", "10")
    assert metrics["eval_loss"] < before["eval_loss"] - 0.5
    old, new = _tensors(moe), _tensors(tmp_path / "run")
    assert old.keys() == new.keys()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    vision = {k for k in old if "vision_tower" in k}
    assert vision and not changed & vision  # bit-identical with --freeze_vision
    assert any("multi_modal_projector" in k for k in changed)
    assert any("experts" in k for k in changed) and any(".gate." in k or "router" in k for k in changed)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all(h["moe/aux_loss"] > 0 and "moe/layer0/expert0" in h for h in logged)
    assert (tmp_path / "run" / "README.md").is_file() and (tmp_path / "run" / "expert_load.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "run")
    assert type(model).__name__ == "UpcycledMoeForImageTextToText"


def test_lora_on_a_conversation_trains_and_merges(vlm_moe, tmp_path):
    moe, _, _ = vlm_moe
    train = write_jsonl(tmp_path / "train.jsonl", shapes_data(tmp_path, 24, conversation=True))
    valid = write_jsonl(tmp_path / "valid.jsonl", shapes_data(tmp_path, 8, conversation=True, seed=1))
    before = _train(moe, train, valid, tmp_path / "zero", "--max_steps", "1", "--learning_rate", "1e-12",
                    "--use_lora")
    metrics = _train(moe, train, valid, tmp_path / "run", "--use_lora", "--max_steps", "20", "--learning_rate", "1e-2")
    assert metrics["eval_loss"] < before["eval_loss"]
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    modules = adapter["target_modules"]
    assert modules and all("language_model" in m for m in modules)  # never the vision tower's attention
    assert adapter["target_parameters"] and adapter["modules_to_save"]
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "UpcycledMoeForImageTextToText"
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_processor is not None
    old, new = _tensors(moe), _tensors(tmp_path / "merged")
    assert all(torch.equal(old[k], new[k]) for k in old if "vision_tower" in k)


def test_conversation_labels_keep_only_the_assistant_turn(vlm_moe, tmp_path):
    from moe_upcycle.train.image_text import ImageTextCollator, ImageTextDataset, read_rows

    moe, _, _ = vlm_moe
    path = write_jsonl(tmp_path / "d.jsonl", shapes_data(tmp_path, 2, conversation=True) + shapes_data(tmp_path, 1, seed=3))
    processor = AutoProcessor.from_pretrained(moe)
    data = ImageTextDataset(read_rows(path, "--train_file"), path, "--train_file", processor)
    batch = ImageTextCollator(processor.tokenizer.pad_token_id)([data[i] for i in range(3)])
    assert batch["pixel_values"].shape[0] == 3 and batch["input_ids"].shape == batch["labels"].shape
    learnt = processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert learnt.split()[:3] == json.loads(open(path).readline())["messages"][1]["content"].split()
    assert "what" not in learnt and (batch["labels"][2] != -100).sum() > 0
    assert not (batch["labels"] == processor.image_token_id).any()


def _fails(capsys, argv, *needles):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1, err
    for needle in needles:
        assert needle in err[-1], err[-1]


@pytest.mark.parametrize("kind, needles", [
    ("missing_image", ["row 2", "does not exist"]),
    ("unreadable_image", ["row 2", "cannot be read"]),
    ("no_images", ["row 1", "no 'image'", "vision-language model"]),
])
def test_bad_image_text_data(vlm_moe, tmp_path, capsys, kind, needles):
    moe, _, valid = vlm_moe
    rows = shapes_data(tmp_path, 4)
    if kind == "missing_image":
        rows[1]["image"] = "images/nowhere.png"
    elif kind == "unreadable_image":
        (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
        rows[1]["image"] = "images/bad.png"
    else:
        rows = [{"text": row["text"]} for row in rows]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    _fails(capsys, ["train", "--model_name_or_path", moe, "--train_file", train, "--validation_file", valid,
                    "--output_dir", tmp_path / "run", *COMMON, "--max_steps", "1"], *needles)
    assert not (tmp_path / "run").exists()


def test_image_rows_for_a_text_model_are_refused(small_models, tmp_path, capsys):
    _, moe = small_models
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a red square"}, *shapes_data(tmp_path, 2)])
    _fails(capsys, ["train", "--model_name_or_path", moe, "--train_file", train, "--output_dir", tmp_path / "run",
                    *COMMON, "--max_steps", "1"], "row 2 has an image", "text model")
    assert not (tmp_path / "run").exists()


def test_lora_groups_find_the_language_model_only(vlm_moe):
    from moe_upcycle.train.lora_targets import LORA_TARGET_GROUPS

    model = AutoModelForImageTextToText.from_pretrained(vlm_moe[0])
    attention = LORA_TARGET_GROUPS["attention"].resolve(model)
    dense_mlp = LORA_TARGET_GROUPS["dense_mlp"].resolve(model)
    assert len(attention) == 2 * 4 and all(".language_model.layers." in name for name in attention)
    assert dense_mlp and all(".language_model.layers.0.mlp." in name for name in dense_mlp)  # layer 1 is MoE
    assert LORA_TARGET_GROUPS["experts"].resolve(model) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert LORA_TARGET_GROUPS["router"].resolve(model) == ["mlp.gate"]


@pytest.mark.parametrize("kind, freeze", [("llava_next", "true"), ("gemma3", "false")])
def test_other_families_train_with_their_processor(kind, freeze, tmp_path):
    dense = build_vlm(kind, tmp_path / "dense")
    moe_upcycle.upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, layers="every:2")
    rows = shapes_data(tmp_path, 12, conversation=True)
    rows[0]["image"] = ["images/0_0.png", "images/0_1.png"]  # two images in one row
    rows[0]["images"] = rows[0].pop("image")
    rows[1]["text"] = rows[1].pop("messages")[1]["content"]  # plain text beside conversations
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    metrics = run_training(["--model_name_or_path", str(tmp_path / "moe"), "--train_file", train,
                            "--validation_split_percentage", "25", "--output_dir", str(tmp_path / "run"), *COMMON,
                            "--max_steps", "4", "--learning_rate", "3e-3", "--per_device_train_batch_size", "4",
                            "--freeze_vision", freeze])
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    old, new = _tensors(tmp_path / "moe"), _tensors(tmp_path / "run")
    kept = [torch.equal(old[k], new[k]) for k in old if "vision_tower" in k]
    assert all(kept) if freeze == "true" else not all(kept)
    assert any(not torch.equal(old[k], new[k]) for k in old if "experts" in k)
