"""Training data for `memtune run`: text files -> tokens -> packed blocks of `seq_len` tokens.

DATA is a JSON Lines file (one object per line, the text under `text_field`), a JSON file holding a
list of such objects (or of strings), a plain-text file (one document), or a directory of such
files (*.jsonl, *.json, *.txt, searched recursively, in name order). Without DATA, the sample
corpus shipped in memtune/data/ is used.

Packing is the standard causal-LM recipe (as in transformers' run_clm.py `group_texts`): documents
are tokenised without special tokens, each is followed by the tokenizer's end-of-text token,
everything is concatenated and cut into blocks of exactly `seq_len` tokens; the last partial block
is dropped. labels = input_ids (the model shifts them), so every block costs the same memory, which
is what the plan was fitted for.

The tokenizer comes from the model when the model has one (a local directory with tokenizer files,
a hub id). Catalog names and bare configs have none: then the byte-level BPE tokenizer shipped in
memtune/data/tokenizer.json is used (1,156 entries, so its ids fit every model's vocabulary).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memtune.errors import UsageError

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE_CORPUS_PATH = PACKAGE_DATA / "sample_corpus.jsonl"
SAMPLE_TOKENIZER_PATH = PACKAGE_DATA / "tokenizer.json"
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


class PackedDataset(torch.utils.data.Dataset):
    """Blocks of `seq_len` consecutive tokens, as {"input_ids", "labels"} (labels = input_ids)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, source: str = ""):
        num_blocks = tokens.numel() // seq_len
        self.blocks = tokens[: num_blocks * seq_len].view(num_blocks, seq_len)
        self.seq_len = seq_len
        self.num_tokens = int(tokens.numel())
        """Tokens read, before the last partial block was dropped."""
        self.source = source

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index].long()
        return {"input_ids": block, "labels": block.clone()}


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents in a JSON Lines / JSON / text file, or in every such file under a directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"data path '{path}' does not exist: "
                         "give a .jsonl, .json or .txt file, or a directory of them")
    if path.is_dir():
        files = sorted(
            file for file in path.rglob("*")
            if file.is_file() and file.suffix.lower() in JSON_SUFFIXES + TEXT_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        if not files:
            raise UsageError(f"data directory '{path}' holds no .jsonl, .json or .txt files: "
                             "put the training text there, or point --data at a file")
        texts = [text for file in files for text in _read_file(file, text_field)]
    else:
        texts = _read_file(path, text_field)
    if not texts:
        raise UsageError(f"data '{path}' holds no text (every document is empty): give a file with training text")
    return texts


def sample_tokenizer() -> Any:
    """The byte-level BPE tokenizer shipped with memtune (for models that come without a tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(SAMPLE_TOKENIZER_PATH),
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=1 << 30,  # packing cuts blocks itself; no length warnings
    )


def load_tokenizer(source: Any) -> tuple[Any, str]:
    """(tokenizer, where it came from) for a `sources.ModelSource`."""
    from transformers import AutoTokenizer

    if source.origin == "local" and source.path is not None:
        if not any((source.path / name).is_file() for name in TOKENIZER_FILES):
            return sample_tokenizer(), f"memtune's sample tokenizer ({source.path} has no tokenizer files)"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True,
                                                      trust_remote_code=getattr(source, "trust_remote_code", False))
            return tokenizer, f"tokenizer of {source.path}"
        except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
            raise UsageError(f"could not load the tokenizer in '{source.path}' ({_first_line(error)}): save it again "
                             "with tokenizer.save_pretrained, or remove its files to use memtune's sample "
                             "tokenizer") from None
    if source.origin == "hub":
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.hub_id,
                                                      trust_remote_code=getattr(source, "trust_remote_code", False))
            return tokenizer, f"tokenizer of {source.hub_id}"
        except Exception as error:  # noqa: BLE001 - any failure means the same thing to the user
            raise UsageError(
                f"could not load the tokenizer of '{source.hub_id}' ({_first_line(error)}): "
                "check the network / HF_TOKEN, or save model and tokenizer to a local directory and run on that"
            ) from None
    return sample_tokenizer(), "memtune's sample tokenizer (catalog models carry no tokenizer)"


def build_dataset(
    tokenizer: Any,
    seq_len: int,
    data: str | Path | None = None,
    text_field: str = "text",
    vocab_size: int | None = None,
) -> PackedDataset:
    """Read, tokenise and pack DATA (or the sample corpus) into blocks of `seq_len` tokens.

    `vocab_size`: the model's; a token id at or above it is refused (wrong tokenizer for the model).
    """
    path = Path(data) if data is not None else SAMPLE_CORPUS_PATH
    texts = read_texts(path, text_field)
    tokens = tokenize(tokenizer, texts)
    if tokens.numel() < seq_len:
        raise UsageError(
            f"data '{path}' has {tokens.numel()} tokens, fewer than one sequence of seq_len={seq_len}: "
            "give more text, or make a plan with a shorter --seq-len"
        )
    if vocab_size is not None:
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise UsageError(
                f"the tokenizer produced token id {largest}, but the model's vocabulary has {vocab_size} entries: "
                "the tokenizer does not belong to this model; save the model's own tokenizer with it"
            )
    return PackedDataset(tokens, seq_len, source=str(path))


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents' tokens in one 1-D tensor, each document followed by the end-of-text token."""
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for document in encoded:
        ids.extend(document)
        if eos is not None:
            ids.append(eos)
    dtype = torch.int32 if (max(ids, default=0) < 2**31) else torch.int64
    return torch.tensor(ids, dtype=dtype)


def _read_file(path: Path, text_field: str) -> list[str]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"data file '{path}' is not UTF-8 text: "
                         "give JSON Lines (.jsonl), JSON or plain text (.txt)") from None
    if path.suffix.lower() not in JSON_SUFFIXES:
        return [content] if content.strip() else []
    stripped = content.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise UsageError(f"data file '{path}' is not valid JSON ({error}): "
                             "fix it, or write one object per line (.jsonl)") from None
        return [text for number, record in enumerate(records, 1)
                if (text := _text_of(record, text_field, path, f"item {number}"))]
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"line {number} of '{path}' is not valid JSON ({error.msg}): "
                             "JSON Lines needs one complete JSON object per line") from None
        text = _text_of(record, text_field, path, f"line {number}")
        if text:
            texts.append(text)
    return texts


def _text_of(record: Any, text_field: str, path: Path, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise UsageError(f"{where} of '{path}' is a {type(record).__name__}, not an object with a '{text_field}' field")
    if text_field not in record:
        fields = ", ".join(sorted(record)) or "none"
        hint = next((name for name in sorted(record) if isinstance(record[name], str)), None)
        fix = f"pass --text-field {hint}" if hint else f"add a '{text_field}' field"
        raise UsageError(f"{where} of '{path}' has no field '{text_field}' (its fields: {fields}): {fix}")
    value = record[text_field]
    if not isinstance(value, str):
        raise UsageError(f"field '{text_field}' at {where} of '{path}' is a {type(value).__name__}, not text")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]
