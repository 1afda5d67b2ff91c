"""``moe-upcycle merge``: fold a LoRA adapter into its base model and save a full model atomically."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ..convert.output import atomic_folder
from ..errors import InvalidOptionError
from .lora import merge_adapter


def merge_to_folder(adapter_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base model and write the result to ``output``."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise InvalidOptionError(f"{adapter_dir} has no adapter_config.json; pass the output folder of a LoRA run")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    model = merge_adapter(str(adapter_dir))
    with atomic_folder(Path(output), overwrite) as tmp:
        model.save_pretrained(tmp)
        if getattr(model.config, "model_type", None) == "upcycled_moe":
            from ..card import write_card

            write_card(tmp, location=str(output))
        tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
        if tokenizer_source:
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
    return Path(output).resolve()
