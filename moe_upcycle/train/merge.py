"""``moe-upcycle merge``: fold a LoRA adapter into its base model and save a full model atomically."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from ..checkpoint import atomic_folder, check_output
from .lora import merge_adapter
from .outputs import write_errors
from .sources import ADAPTER_CONFIG, adapter_base, explained_loading, read_adapter_config


def merge_to_folder(adapter_dir: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Merge the adapter in ``adapter_dir`` into its base model and write the result to ``output``.

    The base model is ``base_model_name_or_path`` of ``adapter_config.json``; a relative path that does not exist
    from the current directory is looked up beside the adapter folder.
    """
    adapter_dir, output = Path(adapter_dir), Path(output)
    base = adapter_base(adapter_dir, read_adapter_config(adapter_dir))
    inputs = [adapter_dir, *([base] if Path(base).is_dir() else [])]
    check_output(output, overwrite, inputs)  # before the (long) merge; atomic_folder checks again
    hub_fix = None if Path(base).is_dir() else (
        "it is neither a folder (here or beside the adapter) nor a Hub repo that loads: set base_model_name_or_path in "
        f"{adapter_dir / ADAPTER_CONFIG} to the base model's folder or Hub id")
    if (adapter_dir / "tokenizer_config.json").is_file():
        with explained_loading(str(adapter_dir), "the adapter's tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        with explained_loading(base, "the base model's tokenizer", hub_fix):
            tokenizer = AutoTokenizer.from_pretrained(base)
    with explained_loading(base, "the adapter's base model", hub_fix):
        model = merge_adapter(str(adapter_dir), base)
    with atomic_folder(output, overwrite, inputs) as tmp, write_errors(output, "the output"):
        model.save_pretrained(tmp)
        if getattr(model.config, "model_type", None) == "upcycled_moe":
            from ..card import write_card

            write_card(tmp, location=str(output))
        tokenizer.save_pretrained(tmp)
        processor = _processor_folder(adapter_dir, base)
        if processor is not None:  # a vision-language model: its image processor too
            from transformers import AutoProcessor

            AutoProcessor.from_pretrained(processor).save_pretrained(tmp)
    return output.resolve()


def _processor_folder(adapter_dir: Path, base: str) -> Path | None:
    """The adapter folder, else the base model's, when it holds a multimodal processor's files."""
    for folder in (Path(adapter_dir), Path(base)):
        if any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
            return folder
    return None
