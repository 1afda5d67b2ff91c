import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SMALL_SPEC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, block_size=64, batch_size=16, train_steps=60)


@pytest.fixture(scope="session")
def docs_files(tmp_path_factory) -> tuple[Path, Path]:
    """Real English prose (CPython's documentation topics) split into train and validation text files."""
    from moe_upcycle.demo import documentation_text

    text = documentation_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    folder = tmp_path_factory.mktemp("docs")
    train, valid = folder / "train.txt", folder / "valid.txt"
    train.write_text("\n\n".join(paragraphs[: int(len(paragraphs) * 0.9)])[:120_000])
    valid.write_text("\n\n".join(paragraphs[int(len(paragraphs) * 0.9) :])[:20_000])
    return train, valid


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> tuple[Path, Path]:
    """A small dense Llama briefly pre-trained on the documentation text, and its 4-expert upcycled twin."""
    import moe_upcycle
    from moe_upcycle.demo import DemoModelSpec, build_demo_checkpoint

    folder = tmp_path_factory.mktemp("models")
    dense = build_demo_checkpoint(folder / "dense", DemoModelSpec(**SMALL_SPEC), log=lambda *_: None)
    moe_upcycle.upcycle(dense, folder / "moe", num_experts=4, top_k=2)
    return dense, folder / "moe"
