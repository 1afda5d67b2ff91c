"""Image-text training data for vision-language models (issue 15): JSON/JSONL rows of image paths and a text or a
conversation, turned into model inputs by the checkpoint's own processor.

    {"image": "shapes/0.png", "text": "a red square"}
    {"images": ["a.png", "b.png"], "messages": [{"role": "user", "content": "what is this ?"},
                                                {"role": "assistant", "content": "a red square"}]}

Relative image paths are resolved against the data file's folder. The processor expands the image tokens (as it does
for inference) and, for a conversation, renders the chat template. Labels are ``-100`` on image tokens and padding,
and, for a conversation, on everything but the assistant's turns (for plain text every text token is learnt).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import InvalidOptionError

IGNORE = -100
IMAGE_FIELDS = ("image", "images")
_MULTIMODAL_TOKENS = ("image_token", "boi_token", "eoi_token", "image_start_token", "image_end_token",
                      "vision_start_token", "vision_end_token")
"""Processor or tokenizer attributes naming tokens the processor writes for an image (never learnt)."""


def is_vision_language(config) -> bool:
    """Whether ``config`` (dense, or an upcycled one whose ``text_config`` is the dense VLM's) has a vision part."""
    return any(getattr(c, "vision_config", None) is not None for c in (config, getattr(config, "text_config", None)))


def read_rows(path: str, flag: str) -> list[dict]:
    """The JSON objects of a ``.json`` (one array, or JSON lines) or ``.jsonl`` file, with a bad row named."""
    file = Path(path)
    if not file.is_file():
        raise InvalidOptionError(f"{flag} {path} {'is a folder, not a file' if file.is_dir() else 'does not exist'}")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InvalidOptionError(f"{flag} {path} is empty; give a file with rows in it")
    try:
        document = json.loads(text)
        rows = document if isinstance(document, list) else [document]
        numbered = list(enumerate(rows, start=1))
    except json.JSONDecodeError:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise InvalidOptionError(f"{flag} {path}: row {number} is not a JSON object ({err.msg}); fix or remove "
                                         "that line") from None
    for number, row in numbered:
        if not isinstance(row, dict):
            raise InvalidOptionError(f"{flag} {path}: row {number} is a JSON {type(row).__name__}, not an object such "
                                     'as {"image": "a.png", "text": "..."}')
    return [dict(row, _row=number) for number, row in numbered]


def has_images(row: dict) -> bool:
    return any(row.get(name) not in (None, [], "") for name in IMAGE_FIELDS)


def _image_paths(row: dict, folder: Path, where: str) -> list[Path]:
    value = row.get("images", row.get("image"))
    paths = [] if value in (None, "") else value if isinstance(value, list) else [value]
    if not all(isinstance(p, str) and p for p in paths):
        raise InvalidOptionError(f"{where}: 'image'/'images' must be a path or a list of paths, got {value!r}")
    return [folder / Path(p).expanduser() for p in paths]


def _open(path: Path, where: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise InvalidOptionError(f"{where}: image {path} does not exist; fix the path (relative paths are read from "
                                 "the data file's folder) or remove the row") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InvalidOptionError(f"{where}: image {path} cannot be read ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())}); replace it or remove the row") from None


def check_modality(rows: list[dict], path: str, flag: str, model: str, vision: bool) -> None:
    """Refuse text-only data for a VLM, and image rows for a text model, naming the row."""
    if vision and not any(has_images(row) for row in rows):
        raise InvalidOptionError(
            f"{flag} {path}: row {rows[0]['_row']} (and every other) has no 'image' or 'images', but {model} is a "
            "vision-language model: give rows with image paths, or train a text model")
    first = next((row for row in rows if has_images(row)), None)
    if not vision and first is not None:
        raise InvalidOptionError(
            f"{flag} {path}: row {first['_row']} has an image, but {model} is a text model without a vision tower: "
            "drop the images or train a vision-language model")


def _messages(row: dict, n_images: int, where: str) -> list[dict]:
    """The conversation with content as lists of parts; images go before the first user text when no part names them."""
    messages = row["messages"]
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
            for m in messages)):
        raise InvalidOptionError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
            else list(m["content"])} for m in messages]
    placed = sum(part.get("type") == "image" for m in out for part in m["content"] if isinstance(part, dict))
    if placed == 0 and n_images:
        user = next((m for m in out if m["role"] == "user"), out[0])
        user["content"] = [{"type": "image"} for _ in range(n_images)] + user["content"]
    elif placed != n_images:
        raise InvalidOptionError(f"{where}: the conversation has {placed} image part(s) but the row {n_images} image(s)")
    if not any(m["role"] == "assistant" for m in out):
        raise InvalidOptionError(f"{where}: the conversation has no assistant turn, so nothing would be learnt")
    return out


class ImageTextDataset(Dataset):
    """Rows of ``read_rows``, processed on access; every image path is opened (and checked) up front."""

    def __init__(self, rows: list[dict], path: str, flag: str, processor):
        self.rows, self.processor = rows, processor
        self.folder = Path(path).absolute().parent
        self.where = {row["_row"]: f"{flag} {path}: row {row['_row']}" for row in rows}
        tokenizer = processor.tokenizer
        names = [getattr(o, a, None) for o in (processor, tokenizer) for a in _MULTIMODAL_TOKENS]
        ids = {tokenizer.convert_tokens_to_ids(n) for n in names if isinstance(n, str)}
        ids.add(getattr(processor, "image_token_id", None))  # padding is masked by the collator
        self.masked = sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)
        for row in rows:
            where = self.where[row["_row"]]
            if not isinstance(row.get("text"), str) and "messages" not in row:
                raise InvalidOptionError(f"{where} has neither 'text' (a string) nor 'messages' (a conversation)")
            paths = _image_paths(row, self.folder, where)
            if "messages" in row:
                _messages(row, len(paths), where)
            for image in paths:
                _open(image, where).close()

    def __len__(self) -> int:
        return len(self.rows)

    def _encode(self, text: str, images: list) -> dict:
        kwargs = {"images": images} if images else {}
        return self.processor(text=[text], return_tensors="pt", **kwargs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        where = self.where[row["_row"]]
        images = [_open(p, where) for p in _image_paths(row, self.folder, where)]
        if "messages" not in row:
            placeholder = self.processor.image_token + " "
            inputs = self._encode(placeholder * len(images) + row["text"] + (self.processor.tokenizer.eos_token or ""),
                                  images)
            labels = inputs["input_ids"][0].clone()
        else:
            inputs, labels = self._conversation(_messages(row, len(images), where), images)
        labels[torch.isin(labels, torch.tensor(self.masked))] = IGNORE
        example = {key: value[0] if key in _ROW_KEYS else value for key, value in inputs.items()}
        example["labels"] = labels
        return example

    def _conversation(self, messages: list[dict], images: list) -> tuple[dict, torch.Tensor]:
        """The whole conversation's inputs, and labels that keep the assistant's turns only: each turn's tokens are
        those between the rendering up to its prompt and the rendering through the turn (images counted as they come)."""
        render = self.processor.apply_chat_template
        inputs = self._encode(render(messages, tokenize=False), images)
        ids = inputs["input_ids"][0]
        labels = torch.full_like(ids, IGNORE)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            seen = sum(part.get("type") == "image" for m in messages[:turn + 1] for part in m["content"])
            start = self._length(render(messages[:turn], tokenize=False, add_generation_prompt=True), images[:seen])
            end = self._length(render(messages[:turn + 1], tokenize=False), images[:seen])
            labels[start:end] = ids[start:end]
        return inputs, labels

    def _length(self, text: str, images: list) -> int:
        return self._encode(text, images)["input_ids"].shape[1]


_ROW_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Processor outputs with one entry per text token; the others (``pixel_values``, ``image_sizes``) are per image."""


class ImageTextCollator:
    """Right-pads the token rows (labels with -100) and stacks the images of the batch (padding ragged image dims)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        pads = {"input_ids": self.pad, "labels": IGNORE}
        batch = {}
        for key in [k for k in examples[0] if k in (*_ROW_KEYS, "labels")]:
            batch[key] = torch.stack([torch.nn.functional.pad(e[key], (0, length - len(e[key])), value=pads.get(key, 0))
                                      for e in examples])
        for key in {k for e in examples for k in e if k not in batch}:
            parts = [e[key] for e in examples if key in e]
            shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
            padded = [p.new_zeros(p.shape[0], *shape) for p in parts]
            for into, part in zip(padded, parts, strict=True):
                into[tuple(slice(0, s) for s in part.shape)] = part
            batch[key] = torch.cat(padded)
        return batch


def load_image_text(data, processor, model: str) -> dict[str, ImageTextDataset]:
    """``{"train", "validation"}`` datasets from ``--train_file`` (and ``--validation_file``, else held out of train)."""
    if data.dataset_name is not None or data.train_file is None:
        raise InvalidOptionError("image-text training reads local files: pass --train_file DATA.jsonl (Hub datasets "
                                 "are for text models)")
    files = {"train": (data.train_file, "--train_file")}
    if data.validation_file is not None:
        files["validation"] = (data.validation_file, "--validation_file")
    for path, flag in files.values():
        if Path(path).suffix.lower() not in (".json", ".jsonl"):
            raise InvalidOptionError(f"{flag} {path}: image-text data must be a .json or .jsonl file of rows")
    rows = {split: read_rows(path, flag) for split, (path, flag) in files.items()}
    for split, (path, flag) in files.items():
        check_modality(rows[split], path, flag, model, vision=True)
    if "validation" not in rows:
        train = rows["train"]
        held = len(train) * data.validation_split_percentage // 100
        if not 0 < data.validation_split_percentage < 100 or held < 1 or held >= len(train):
            raise InvalidOptionError(
                f"{data.train_file} holds {len(train)} row(s), too few to hold out {data.validation_split_percentage}% "
                "for validation: give more rows or pass --validation_file")
        rows = {"train": train[:-held], "validation": train[-held:]}
        files["validation"] = files["train"]
    datasets = {split: ImageTextDataset(rows[split], *files[split], processor) for split in rows}
    for split, limit in (("train", data.max_train_samples), ("validation", data.max_eval_samples)):
        if limit is not None:
            datasets[split].rows = datasets[split].rows[:limit]
    return datasets
