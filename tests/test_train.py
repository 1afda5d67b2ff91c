"""Fine-tuning through the Trainer: LoRA, routing statistics, gradient accumulation, merge, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_upcycle.cli import main
from moe_upcycle.errors import InvalidOptionError
from moe_upcycle.train import run_training

COMMON = ["--block_size", "64", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
          "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--seed", "0", "--max_eval_samples", "24",
          "--dataloader_pin_memory", "false", "--disable_tqdm", "true"]


def _train(model, train, valid, out, *extra):
    return run_training(["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(valid),
                         "--output_dir", str(out), *COMMON, *extra])


def test_lora_training_lowers_validation_loss_and_logs_routing(small_models, docs_files, tmp_path):
    from moe_upcycle.train.evaluate_file import evaluate_file

    _, moe = small_models
    train, valid = docs_files
    before = evaluate_file(str(moe), str(valid), block_size=64, max_eval_samples=24)
    metrics = _train(moe, train, valid, tmp_path / "run", "--use_lora", "--max_steps", "60", "--logging_steps", "20",
                     "--per_device_train_batch_size", "16")
    assert metrics["eval_loss"] < before["eval_loss"] - 0.05
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert saved["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert saved["perplexity"] == pytest.approx(torch.exp(torch.tensor(saved["eval_loss"])).item(), rel=1e-4)
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    logs = [h for h in history if "loss" in h]
    assert len(logs) == 3
    for entry in logs:
        loads = [entry[f"moe/layer0/expert{e}"] for e in range(4)]
        assert sum(loads) == pytest.approx(1.0)
        assert entry["moe/load_max"] >= max(loads) and entry["moe/load_min"] <= min(loads)
        assert entry["moe/aux_loss"] >= 1.0 - 1e-6 and entry["moe/z_loss"] > 0 and entry["moe/entropy"] > 0
    png = (tmp_path / "run" / "expert_load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "run" / "expert_load.png")
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    load = json.loads((tmp_path / "run" / "expert_load.json").read_text())
    assert load["moe_layers"] == [0, 1] and len(load["load"][0]) == 4


def test_gradient_accumulation_matches_a_full_batch(small_models, docs_files, tmp_path):
    _, moe = small_models
    train, valid = docs_files
    runs = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        out = tmp_path / f"ga{accumulation}"
        _train(moe, train, valid, out, "--max_steps", "1", "--logging_steps", "1", "--per_device_train_batch_size",
               str(batch), "--gradient_accumulation_steps", str(accumulation), "--use_lora")
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[accumulation] = history[0]
    assert runs[1]["loss"] == pytest.approx(runs[4]["loss"], abs=1e-4)
    assert runs[1]["moe/aux_loss"] == pytest.approx(runs[4]["moe/aux_loss"], abs=1e-4)


def test_merge_matches_peft_model(small_models, docs_files, tmp_path):
    from peft import AutoPeftModelForCausalLM

    _, moe = small_models
    train, valid = docs_files
    _train(moe, train, valid, tmp_path / "run", "--use_lora", "--max_steps", "8", "--lora_target", "attention,experts")
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "UpcycledMoeForCausalLM"
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(moe).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - a).abs().max() > 1e-3, "the adapter should have changed the model"
    assert (a - b).abs().max().item() <= 1e-4


def test_resume_continues_the_same_run(small_models, docs_files, tmp_path):
    _, moe = small_models
    train, valid = docs_files
    args = ["--use_lora", "--max_steps", "6", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3"]
    _train(moe, train, valid, tmp_path / "full", *args)
    full = [h["loss"] for h in json.loads((tmp_path / "full" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    _train(moe, train, valid, tmp_path / "part", *args[:-4], "--save_strategy", "steps", "--save_steps", "3",
           "--max_steps", "6")
    # simulate an interruption: resume a fresh run from the step-3 checkpoint of the first one
    _train(moe, train, valid, tmp_path / "full", *args, "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"))
    state = json.loads((tmp_path / "full" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    resumed = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert resumed[:3] == pytest.approx(full[:3]) and resumed[3:] == pytest.approx(full[3:], abs=1e-4)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--train_file", "/nonexistent/train.txt"], "does not exist"),
        (["--text_column", "content"], "text column 'content' is not in the data; its columns are ['text']"),
        (["--use_lora", "--lora_target", "attention,qkv_fused"], "matches no module"),
    ],
)
def test_bad_training_input(small_models, docs_files, tmp_path, extra, needle):
    _, moe = small_models
    train, valid = docs_files
    args = ["--model_name_or_path", str(moe), "--train_file", str(train), "--output_dir", str(tmp_path / "o"), *COMMON,
            "--max_steps", "1", *extra]
    with pytest.raises(InvalidOptionError) as info:
        run_training(args)
    assert needle in str(info.value)
    if "matches no module" in needle:
        assert "q_proj" in str(info.value) and "attention" in str(info.value)


def test_moe_options_on_a_dense_model_are_refused(small_models, docs_files, tmp_path, capsys):
    dense, _ = small_models
    train, _ = docs_files
    code = main(["train", "--model_name_or_path", str(dense), "--train_file", str(train), "--output_dir",
                 str(tmp_path / "o"), "--router_only", *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("moe-upcycle: error: --router_only need an upcycled MoE model")


def _state(folder):
    from safetensors.torch import load_file

    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def test_full_finetune_in_bf16_with_checkpointing(small_models, docs_files, tmp_path):
    _, moe = small_models
    train, valid = docs_files
    metrics = _train(moe, train, valid, tmp_path / "run", "--max_steps", "3", "--bf16", "true",
                     "--gradient_checkpointing", "true", "--logging_steps", "1")
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    before, after = _state(moe), _state(tmp_path / "run")
    for name in ("model.model.layers.0.mlp.gate.weight", "model.model.layers.0.mlp.experts.gate_up_proj",
                 "model.model.layers.1.self_attn.q_proj.weight"):
        assert not torch.equal(before[name], after[name].to(before[name].dtype)), name


def test_router_only_training_changes_only_routers(small_models, docs_files, tmp_path):
    _, moe = small_models
    train, valid = docs_files
    _train(moe, train, valid, tmp_path / "run", "--router_only", "--max_steps", "3", "--learning_rate", "1e-2")
    before, after = _state(moe), _state(tmp_path / "run")
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == ["model.model.layers.0.mlp.gate.weight", "model.model.layers.1.mlp.gate.weight"]


def test_yaml_recipe_with_overrides(small_models, docs_files, tmp_path):
    from pathlib import Path

    _, moe = small_models
    train, valid = docs_files
    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_demo_lora.yaml"
    assert config.read_text().startswith("# moe-upcycle train --config configs/finetune_demo_lora.yaml")
    code = main(["train", "--config", str(config), "--model_name_or_path", str(moe), "--train_file", str(train),
                 "--validation_file", str(valid), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
                 "--block_size", "64", "--max_eval_samples", "8", "--disable_tqdm", "true"])
    assert code == 0
    adapter = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_streamed_dataset_folder(small_models, docs_files, tmp_path):
    """--dataset_name goes through datasets.load_dataset (a local dataset folder here), streamed."""
    _, moe = small_models
    train, valid = docs_files
    folder = tmp_path / "dataset"
    folder.mkdir()
    for split, path in (("train", train), ("validation", valid)):
        rows = [{"content": p} for p in path.read_text().split("\n\n") if p.strip()]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    metrics = run_training(["--model_name_or_path", str(moe), "--dataset_name", str(folder), "--streaming",
                            "--text_column", "content", "--output_dir", str(tmp_path / "run"), *COMMON,
                            "--max_steps", "3", "--use_lora"])
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert json.loads((tmp_path / "run" / "trainer_state.json").read_text())["global_step"] == 3


def test_unknown_hub_dataset_is_a_clear_error(small_models, tmp_path):
    _, moe = small_models
    with pytest.raises(InvalidOptionError, match="cannot load dataset 'nobody/no-such-dataset'"):
        run_training(["--model_name_or_path", str(moe), "--dataset_name", "nobody/no-such-dataset",
                      "--output_dir", str(tmp_path / "o"), *COMMON, "--max_steps", "1"])


def test_evaluate_command_scores_dense_and_moe_alike(small_models, docs_files, tmp_path, capsys):
    dense, moe = small_models
    _, valid = docs_files
    results = []
    for model in (dense, moe):
        out = tmp_path / f"{model.name}.json"
        assert main(["evaluate", str(model), "--validation_file", str(valid), "--block_size", "64",
                     "--max_eval_samples", "16", "--output_json", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["tokens"] == results[1]["tokens"] == 16 * 63
    assert results[0]["eval_loss"] == pytest.approx(results[1]["eval_loss"], abs=1e-5)
    assert "perplexity" in capsys.readouterr().out


def test_routing_statistics_reach_tensorboard(small_models, docs_files, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, moe = small_models
    train, valid = docs_files
    common = [a for a in COMMON if a not in ("--report_to", "none")]
    run_training(["--model_name_or_path", str(moe), "--train_file", str(train), "--validation_file", str(valid),
                  "--output_dir", str(tmp_path / "run"), *common, "--report_to", "tensorboard",
                  "--max_steps", "2", "--logging_steps", "1", "--use_lora"])
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/moe/aux_loss" in tags and "train/moe/layer1/expert3" in tags
    assert len(events.Scalars("train/moe/aux_loss")) == 2
