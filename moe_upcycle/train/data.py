"""Training data through ``datasets``: local text / JSON lines / parquet files or a Hub dataset, tokenised
with the model's tokenizer and packed into ``block_size`` blocks (as in Transformers' ``run_clm.py``)."""

from __future__ import annotations

import json
import logging
from itertools import chain
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, Value, load_dataset
from datasets.exceptions import DatasetGenerationError
from pyarrow import ArrowException

from ..errors import InvalidOptionError
from .args import DataArguments

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _BUILDERS:
        raise InvalidOptionError(f"{path}: unsupported data file type {suffix!r}; use one of {sorted(_BUILDERS)}")
    return _BUILDERS[suffix]


def _flag(split: str) -> str:
    return f"--{split if split == 'validation' else 'train'}_file"


def load_files(files: dict[str, str]) -> DatasetDict:
    """Load local data files by split name; plain text is read one paragraph (blank-line separated) per example."""
    for split, path in files.items():
        if not Path(path).is_file():
            found = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
            raise InvalidOptionError(f"{_flag(split)} {path} {found}")
        if Path(path).stat().st_size == 0:
            raise InvalidOptionError(f"{_flag(split)} {path} is empty; give a file with text in it")
    builders = {_builder_for(p) for p in files.values()}
    if len(builders) > 1:
        raise InvalidOptionError(f"training and validation files must have the same type, got {sorted(builders)}")
    builder = builders.pop()
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    # The JSON builder logs its parse error before raising; the error raised here says it better, with the line.
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return load_dataset(builder, data_files=files, **kwargs)
    except (DatasetGenerationError, ArrowException) as err:  # parquet errors come straight from pyarrow
        raise InvalidOptionError(_unreadable(files, builder, err)) from None
    finally:
        quiet.setLevel(level)


def _first_bad_json_line(path: str) -> tuple[int, str] | None:
    """(line number, reason) of the first line of a JSON lines file that is not a JSON object, if any."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return number, err.msg
            if not isinstance(record, dict):
                return number, f"a JSON {type(record).__name__}, not an object"
    return None


def _is_json_document(path: str) -> bool:
    """Whether ``path`` holds one JSON document (a ``.json`` file need not be JSON lines)."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError:
        return False
    return True


def _unreadable(files: dict[str, str], builder: str, err: Exception) -> str:
    """Why ``datasets`` could not read ``files``: the bad line of a JSON lines file, else the underlying error."""
    for split, path in files.items() if builder == "json" else ():
        bad = _first_bad_json_line(path)
        if bad is not None and not _is_json_document(path):
            return (f"{_flag(split)} {path}: line {bad[0]} is not a JSON object ({bad[1]}); every line of a JSON lines "
                    "file must be one object such as {\"text\": \"...\"}: fix or remove that line")
    cause = err.__cause__ or err
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{', '.join(files.values())} could not be read as {builder} data ({type(cause).__name__}: {reason})"


def load_raw(data: DataArguments) -> DatasetDict | dict:
    """Raw text splits ``train`` and ``validation`` (carved from train when none is given)."""
    if data.dataset_name is not None:
        if data.train_file is not None:
            raise InvalidOptionError("give either --dataset_name or --train_file, not both")
        try:
            raw = load_dataset(data.dataset_name, data.dataset_config_name, streaming=data.streaming)
        except (FileNotFoundError, ConnectionError, ValueError) as err:
            raise InvalidOptionError(
                f"cannot load dataset {data.dataset_name!r} ({type(err).__name__}: {err}); check the id and "
                "configuration name, log in for private datasets, or pass local files with --train_file"
            ) from None
    elif data.train_file is not None:
        files = {"train": data.train_file}
        if data.validation_file is not None:
            files["validation"] = data.validation_file
        raw = load_files(files)
    else:
        raise InvalidOptionError("no training data: pass --train_file FILE or --dataset_name HUB_ID")
    if "validation" not in raw:
        if data.streaming:
            raise InvalidOptionError("a streamed dataset without a validation split needs --validation_file")
        if not 0 < data.validation_split_percentage < 100:
            raise InvalidOptionError(
                f"validation_split_percentage={data.validation_split_percentage} is invalid: expected 1..99"
            )
        try:
            split = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, seed=0, shuffle=False)
        except ValueError:  # too few examples to hold some out
            raise InvalidOptionError(
                f"the training data holds {len(raw['train'])} example(s), too few to hold out "
                f"{data.validation_split_percentage}% for validation: give more text or pass --validation_file"
            ) from None
        raw = DatasetDict(train=split["train"], validation=split["test"])
    for dataset in raw.values():
        check_text_column(dataset, data.text_column)
    return raw


def check_text_column(dataset, column: str) -> None:
    """Raise if ``column`` is not in ``dataset`` or does not hold text (streamed datasets may not know their columns)."""
    columns = dataset.column_names
    if columns is not None and column not in columns:
        raise InvalidOptionError(f"text column {column!r} is not in the data; its columns are {columns}")
    feature = (dataset.features or {}).get(column)
    if feature is not None and not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise InvalidOptionError(f"text column {column!r} holds {feature}, not text; name a column of strings with "
                                 "--text_column")


def pack(raw, tokenizer, data: DataArguments):
    """Tokenise the text column and concatenate it into blocks of ``block_size`` tokens with ``labels``."""
    block = data.block_size

    def tokenize(batch):
        # Paragraphs of a text file are joined by a blank line; records of JSON/parquet data are
        # separate documents, ended by the EOS token.
        end = "\n\n" if data.paragraphs else (tokenizer.eos_token or "")
        return tokenizer([t + end for t in batch[data.text_column] if t])

    def group(batch):
        joined = {k: list(chain(*batch[k])) for k in batch}
        total = (len(joined["input_ids"]) // block) * block
        out = {k: [v[i : i + block] for i in range(0, total, block)] for k, v in joined.items()}
        out["labels"] = [ids.copy() for ids in out["input_ids"]]
        return out

    packed = {}
    for split, dataset in raw.items():
        columns = dataset.column_names
        kwargs = {} if isinstance(dataset, IterableDataset) else {"desc": f"tokenising {split}"}
        tokens = dataset.map(tokenize, batched=True, remove_columns=columns, **kwargs)
        kwargs = {} if isinstance(dataset, IterableDataset) else {"desc": f"packing {split} into {block}-token blocks"}
        packed[split] = tokens.map(group, batched=True, **kwargs)
    for split, limit in (("train", data.max_train_samples), ("validation", data.max_eval_samples)):
        if limit is not None and split in packed:
            ds = packed[split]
            packed[split] = ds.take(limit) if isinstance(ds, IterableDataset) else ds.select(range(min(limit, len(ds))))
    for split, dataset in packed.items():
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise InvalidOptionError(
                f"the {'training' if split == 'train' else split} split holds fewer than block_size={block} tokens; give "
                "more text or a smaller block_size"
            )
    return packed
