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


def build_demo_checkpoint(folder: str | Path, spec: DemoModelSpec | None = None, log=print) -> Path:
    """Train the tokenizer and the dense Llama on the documentation text and save both to ``folder``."""
    spec = spec or DemoModelSpec()
    folder = Path(folder)
    torch.manual_seed(spec.seed)
    text = documentation_text()
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


def run(workdir: str | Path = "demo_run") -> int:
    """Build the dense model, upcycle it to 8 experts / top-2, verify it and generate from both models."""
    from . import upcycle

    workdir = Path(workdir)
    dense_dir, moe_dir = workdir / "dense", workdir / "moe"
    if not (dense_dir / "config.json").is_file():
        print(f"[1/3] building the embedded dense Llama in {dense_dir}")
        build_demo_checkpoint(dense_dir)
    else:
        print(f"[1/3] reusing the dense Llama in {dense_dir}")
    print(f"[2/3] upcycling it into {moe_dir} (8 experts, top-2, every layer) and verifying")
    result = upcycle(dense_dir, moe_dir, num_experts=8, top_k=2, verify=True, overwrite=True)
    for note in result.notes:
        print("  " + note)
    print(f"  parameters: {result.total_params:,} total, {result.active_params:,} active per token")
    print("[3/3] greedy generation, dense vs MoE:")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(moe_dir)
    inputs = tokenizer(DEMO_PROMPT, return_tensors="pt")
    texts = []
    for name, path in (("dense", dense_dir), ("moe", moe_dir)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0], skip_special_tokens=True))
        print(f"  {name:5s} {type(model).__name__}: {texts[-1]!r}")
    print("  identical generations" if texts[0] == texts[1] else "  generations differ")
    return 0 if texts[0] == texts[1] else 1
