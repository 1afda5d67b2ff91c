"""The embedded default: a small dense Llama trained briefly on real English text, then upcycled.

Everything comes from this machine: the text is CPython's own documentation prose
(``pydoc_data.topics``), the tokenizer is a byte-level BPE trained on it with ``tokenizers``, and the dense
model is a 4-layer Llama trained for a few hundred steps. ``moe-upcycle demo`` then converts it to 8
experts / top-2, verifies the logits and generates from both models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

DEMO_PROMPT = "The import statement"


def documentation_text() -> str:
    """~465k characters of English prose: the topics of CPython's bundled documentation."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def train_tokenizer(text: str, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``text`` (a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


@dataclass
class DemoModelSpec:
    """Shape and training budget of the embedded dense Llama."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2048
    block_size: int = 128
    batch_size: int = 16
    train_steps: int = 300
    learning_rate: float = 3e-3
    seed: int = 0


def build_demo_checkpoint(folder: str | Path, spec: DemoModelSpec | None = None, log=print, text: str | None = None) -> Path:
    """Train the tokenizer and the dense Llama on ``text`` (default: all documentation text) and save both."""
    spec = spec or DemoModelSpec()
    folder = Path(folder)
    torch.manual_seed(spec.seed)
    text = documentation_text() if text is None else text
    tokenizer = train_tokenizer(text, spec.vocab_size)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=4 * spec.block_size,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    if spec.train_steps:
        _pretrain(model, ids, spec, log)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pretrain(model: torch.nn.Module, ids: torch.Tensor, spec: DemoModelSpec, log) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / spec.train_steps))
    )
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    start = time.perf_counter()
    for step in range(spec.train_steps):
        offsets = torch.randint(0, ids.numel() - spec.block_size - 1, (spec.batch_size,), generator=generator)
        batch = torch.stack([ids[o : o + spec.block_size] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == spec.train_steps - 1:
            log(f"  dense pre-training step {step + 1}/{spec.train_steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f}s)")
    model.eval()


def write_text_splits(folder: str | Path, holdout: float = 0.1) -> tuple[Path, Path]:
    """Write the documentation text as ``train.txt`` / ``valid.txt`` (the last ``holdout`` of its paragraphs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [p for p in documentation_text().split("\n\n") if p.strip()]
    cut = int(len(paragraphs) * (1 - holdout))
    train, valid = folder / "train.txt", folder / "valid.txt"
    train.write_text("\n\n".join(paragraphs[:cut]))
    valid.write_text("\n\n".join(paragraphs[cut:]))
    return train, valid


def _generate(path: Path, tokenizer, inputs) -> str:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run(workdir: str | Path = "demo_run", finetune_steps: int = 60) -> int:
    """Build the dense model, upcycle it (8 experts, top-2), verify it, fine-tune it with LoRA and compare."""
    from .convert import upcycle
    from .train import run_training
    from .train.evaluate_file import evaluate_file
    from .train.merge import merge_to_folder

    workdir = Path(workdir)
    dense_dir, moe_dir, lora_dir = workdir / "dense", workdir / "moe", workdir / "lora"
    train_file, valid_file = write_text_splits(workdir / "data")
    if not (dense_dir / "config.json").is_file():
        print(f"[1/4] building the embedded dense Llama in {dense_dir} (trained on {train_file} only)")
        build_demo_checkpoint(dense_dir, text=train_file.read_text())
    else:
        print(f"[1/4] reusing the dense Llama in {dense_dir}")
    print(f"[2/4] upcycling it into {moe_dir} (8 experts, top-2, every layer) and verifying")
    result = upcycle(dense_dir, moe_dir, num_experts=8, top_k=2, verify=True, overwrite=True)
    for note in result.notes:
        print("  " + note)
    print(f"  parameters: {result.total_params:,} total, {result.active_params:,} active per token")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(moe_dir)
    inputs = tokenizer(DEMO_PROMPT, return_tensors="pt")
    dense_text, moe_text = _generate(dense_dir, tokenizer, inputs), _generate(moe_dir, tokenizer, inputs)
    print(f"  dense generation: {dense_text!r}")
    print(f"  MoE generation:   {moe_text!r} ({'identical' if dense_text == moe_text else 'DIFFERENT'})")

    print(f"[3/4] LoRA fine-tuning the MoE model for {finetune_steps} steps (configs/finetune_demo_lora.yaml)")
    metrics = run_training([
        "--model_name_or_path", str(moe_dir), "--train_file", str(train_file), "--validation_file", str(valid_file),
        "--output_dir", str(lora_dir), "--block_size", "128", "--use_lora",
        "--lora_target", "attention", "experts", "router", "--max_steps", str(finetune_steps),
        "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--warmup_steps", "5",
        "--logging_steps", "20", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0",
    ])
    merged_dir = workdir / "moe-lora-merged"
    merge_to_folder(lora_dir, merged_dir, overwrite=True)

    print(f"[4/4] validation perplexity on held-out documentation text ({valid_file})")
    dense_eval = evaluate_file(str(dense_dir), str(valid_file), block_size=128)
    moe_eval = evaluate_file(str(moe_dir), str(valid_file), block_size=128)
    print(f"  {'model':<44}{'eval_loss':>10}{'perplexity':>12}")
    for name, m in (("dense source", dense_eval), ("MoE right after upcycling", moe_eval),
                    (f"MoE + LoRA, {finetune_steps} steps (merged)", metrics)):
        print(f"  {name:<44}{m['eval_loss']:>10.4f}{m['perplexity']:>12.2f}")
    print(f"  routing heatmap: {lora_dir / 'expert_load.png'}; merged model: {merged_dir}")
    print(f"  generation after fine-tuning: {_generate(merged_dir, tokenizer, inputs)!r}")
    same = dense_text == moe_text and abs(moe_eval["eval_loss"] - dense_eval["eval_loss"]) <= 1e-4
    if not same:
        print("  the fresh MoE model did not reproduce the dense model; please report this")
    return 0 if same else 1
