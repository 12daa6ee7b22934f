"""Training data for `memtune run`: text files -> tokens -> the batches of --packing (concat, none, bfd, padding-free).

DATA is a JSON Lines file (one object per line, the text under `text_field`), a JSON file holding a
list of such objects (or of strings), a plain-text file (one document), or a directory of such
files (*.jsonl, *.json, *.txt, searched recursively, in name order). Without DATA, the sample
corpus shipped in memtune/data/ is used.

Documents are tokenised without special tokens, each followed by the tokenizer's end-of-text token (`tokenize_corpus`).
The batching modes are the ones `run.data_plan` plans for, batch for batch (its module docstring):

- concat (the default; transformers' run_clm.py `group_texts`): everything concatenated and cut into blocks of exactly
  `seq_len` tokens, the last partial block dropped (`PackedDataset`, `default_data_collator`);
- none: one document per row, truncated at `seq_len`, padded on the right to the longest row of the micro-batch, labels
  -100 on the padding (`DocumentDataset`, `RowCollator`);
- bfd: TRL's best-fit-decreasing rows (`trl.data_utils.pack_dataset(strategy="bfd")`, TRL's own code: `pack_bfd`), each
  row padded to the longest row of the micro-batch, position_ids restarting at every document (`RowCollator`);
- padding-free: the micro-batch's documents concatenated into one row, position_ids restarting at every document
  (TRL's `DataCollatorForLanguageModeling(padding_free=True)`; transformers' `DataCollatorWithFlattening`).

Where documents share a row (bfd, padding-free), the collators pass position_ids and no attention_mask, as TRL's
padding-free collator does: transformers 5.x (`masking_utils.find_packed_sequence_indices`, when attention_mask is None
and there is no cache - the plan's step turns use_cache off) then builds a block-diagonal causal mask from them, so no
document attends to another under sdpa and eager too, not only with flash-attn's varlen kernel; each document's first
label is -100 (TRL's `labels[position_ids == 0] = -100`), so no document predicts the next one's first token. Right
padding gets no attention_mask either (none, bfd): under a causal mask no real token attends to a later padding token,
so the loss and gradients are those with the mask, and SDPA keeps the kernel the plan traced (an explicit mask would
move it off flash).

The corpus is never held as Python lists of token ids: the text is read file by file and line by line
(`iter_texts`), tokenised `TOKENIZE_CHUNK` documents at a time into one flat int32 tensor with document offsets
(`TokenizedCorpus`, 4 bytes a token); the rows are views into it (bfd: Arrow's columns turned into the same layout).

The tokenizer comes from the model when the model has one (a local directory with tokenizer files,
a hub id). Catalog names and bare configs have none: then the byte-level BPE tokenizer shipped in
memtune/data/tokenizer.json is used (1,156 entries, so its ids fit every model's vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memtune.config import TRL_EXTRA_HINT
from memtune.errors import UsageError
from memtune.options import DEFAULT_PACKING, PACKING_MODES

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
SAMPLE_CORPUS_PATH = PACKAGE_DATA / "sample_corpus.jsonl"
SAMPLE_TOKENIZER_PATH = PACKAGE_DATA / "tokenizer.json"
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
TOKENIZE_CHUNK = 1000
"""Documents tokenised per tokenizer call: only one chunk's token ids are Python lists at a time."""
IGNORE_INDEX = -100
"""The label the loss skips (torch cross_entropy's ignore_index, transformers' and TRL's padding label)."""


@dataclass(frozen=True)
class TokenizedCorpus:
    """Every document's tokens in one flat tensor: document i is tokens[offsets[i]:offsets[i + 1]] (its end-of-text
    token included). int32 ids (int64 only for a vocabulary past 2**31), int64 offsets."""

    tokens: torch.Tensor
    offsets: torch.Tensor
    source: str = ""

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    @property
    def lengths(self) -> list[int]:
        """Tokens of each document (what `run.data_plan.token_lengths` counts)."""
        return (self.offsets[1:] - self.offsets[:-1]).tolist()

    def document(self, index: int) -> torch.Tensor:
        return self.tokens[int(self.offsets[index]):int(self.offsets[index + 1])]


class PackedDataset(torch.utils.data.Dataset):
    """concat: blocks of `seq_len` consecutive tokens, as {"input_ids", "labels"} (labels = input_ids)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, source: str = ""):
        num_blocks = tokens.numel() // seq_len
        self.blocks = tokens[: num_blocks * seq_len].view(num_blocks, seq_len)
        self.seq_len = seq_len
        self.num_tokens = int(tokens.numel())
        """Tokens read, before the last partial block was dropped."""
        self.source = source
        self.packing = "concat"

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index].long()
        return {"input_ids": block, "labels": block.clone()}

    def row_lengths(self) -> list[int]:
        """Tokens of each row (every block: seq_len)."""
        return [self.seq_len] * len(self)


class DocumentDataset(torch.utils.data.Dataset):
    """none and padding-free: one document per item, truncated at `seq_len` (its tail dropped, as TRL's truncation
    does), as {"input_ids"}; the collator makes the labels. Empty documents are skipped (TRL drops them too)."""

    def __init__(self, corpus: TokenizedCorpus, seq_len: int, packing: str = "none"):
        self.corpus = corpus
        self.seq_len = seq_len
        self.packing = packing
        self.indices = torch.nonzero(corpus.offsets[1:] > corpus.offsets[:-1]).flatten()
        self.num_tokens = int(corpus.tokens.numel())
        self.source = corpus.source

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.corpus.document(int(self.indices[index]))[:self.seq_len].long()}

    def row_lengths(self) -> list[int]:
        """Tokens of each row: each document truncated at seq_len."""
        lengths = self.corpus.offsets[1:] - self.corpus.offsets[:-1]
        return lengths[self.indices].clamp(max=self.seq_len).tolist()


class PackedRowsDataset(torch.utils.data.Dataset):
    """bfd: packed rows, each several whole (truncated) documents, as {"input_ids", "position_ids"} with the positions
    restarting at every document (a model input: Trainer's column removal keeps it); row i is
    tokens[row_offsets[i]:row_offsets[i + 1]], its documents' lengths seq_lengths[length_offsets[i]:...[i + 1]]."""

    def __init__(self, tokens: torch.Tensor, row_offsets: torch.Tensor, seq_lengths: torch.Tensor,
                 length_offsets: torch.Tensor, seq_len: int, source: str = "", num_tokens: int = 0):
        self.tokens, self.row_offsets = tokens, row_offsets
        self.seq_lengths, self.length_offsets = seq_lengths, length_offsets
        self.seq_len = seq_len
        self.packing = "bfd"
        self.source = source
        self.num_tokens = num_tokens
        """Tokens read, before truncation."""

    def __len__(self) -> int:
        return int(self.row_offsets.numel()) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.tokens[int(self.row_offsets[index]):int(self.row_offsets[index + 1])].long()
        lengths = self.seq_lengths[int(self.length_offsets[index]):int(self.length_offsets[index + 1])].tolist()
        return {"input_ids": row, "position_ids": positions_of(lengths)}

    def document_lengths(self, index: int) -> list[int]:
        """Tokens of each document of row `index`, in row order."""
        return self.seq_lengths[int(self.length_offsets[index]):int(self.length_offsets[index + 1])].tolist()

    def row_lengths(self) -> list[int]:
        """Tokens of each packed row (<= seq_len)."""
        return (self.row_offsets[1:] - self.row_offsets[:-1]).tolist()


TrainingDataset = PackedDataset | DocumentDataset | PackedRowsDataset


def positions_of(seq_lengths: Iterable[int]) -> torch.Tensor:
    """position_ids restarting at 0 at every document of a row: lengths 3, 2 -> 0 1 2 0 1 (TRL's
    `get_position_ids_from_packed_seq_lengths`)."""
    pieces = [torch.arange(int(length)) for length in seq_lengths]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class RowCollator:
    """none and bfd: rows padded on the right with `pad_token_id` to the longest row of the micro-batch; labels the
    ids, -100 on the padding. Items with "position_ids" (bfd rows) keep them, padded with 0 as TRL pads them (each
    padding token is then a sequence of its own for `find_packed_sequence_indices`), and each document's first label
    is -100 (no document predicts the next one's first token). No attention_mask: module docstring."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(int(item["input_ids"].numel()) for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        packed = "position_ids" in items[0]
        positions = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            ids = item["input_ids"]
            input_ids[row, :ids.numel()] = ids
            labels[row, :ids.numel()] = ids
            if packed:
                positions[row, :ids.numel()] = item["position_ids"]
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            labels[positions == 0] = IGNORE_INDEX  # TRL's padding-free rule; column 0 is never predicted anyway
            batch["position_ids"] = positions
        return batch


def collator_for(packing: str, tokenizer: Any) -> Any:
    """The data collator of `packing`: transformers' `default_data_collator` (concat), `RowCollator` (none, bfd),
    transformers' `DataCollatorWithFlattening` (padding-free: the micro-batch's documents in one row, 1 x their
    tokens, position_ids restarting at every document, each document's first label -100, as TRL's
    `DataCollatorForLanguageModeling(padding_free=True)` without the flash-attn cu_seq_lens, which transformers
    derives from position_ids where flash runs). The pad id: the tokenizer's, else its end-of-text token, else 0
    (the padding's labels are -100, so its id never reaches the loss)."""
    check_packing(packing)
    if packing == "concat":
        from transformers import default_data_collator

        return default_data_collator
    if packing == "padding-free":
        from transformers import DataCollatorWithFlattening

        # Same class and arguments in transformers 5.17 (the GPU machine) and 5.24. One difference: 5.24 drops an
        # empty document, 5.17 keeps its -100 label with no token (labels one longer than input_ids); the rows here
        # are never empty (`iter_texts` reads non-empty documents; `tokenize_corpus` ends each with the end-of-text
        # token where the tokenizer has one)
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return RowCollator(pad_token_id=int(pad or 0))


def check_packing(packing: str) -> None:
    """Raise UsageError (exit 2) for a --packing value that is not one of PACKING_MODES, naming the value seen."""
    if packing not in PACKING_MODES:
        raise UsageError(f"--packing {packing!r} is not a batching mode: use one of {', '.join(PACKING_MODES)} "
                         f"(default {DEFAULT_PACKING}, what memtune run does without --packing)")


def import_pack_dataset() -> Any:
    """TRL's `pack_dataset` (and with it `datasets`). Raises UsageError (exit 2) with the install hint where TRL is
    missing: --packing bfd runs TRL's own best-fit-decreasing packing, not a copy of it."""
    try:
        from trl.data_utils import pack_dataset  # type: ignore[import-not-found, unused-ignore]  # optional ([trl])
    except ImportError as error:
        raise UsageError(f"--packing bfd packs with TRL's best-fit-decreasing pack_dataset, and TRL could not be "
                         f"imported ({error}): install it with {TRL_EXTRA_HINT}, or choose --packing padding-free, "
                         "none or concat") from None
    return pack_dataset


def pack_bfd(corpus: TokenizedCorpus, seq_len: int) -> PackedRowsDataset:
    """bfd rows by TRL's own `pack_dataset(dataset, seq_len, strategy="bfd")`: its `_pack_bfd` drops empty
    documents, truncates each at seq_len and places them longest first, best fit, per `datasets.map` batch of 1,000.
    The corpus goes to Arrow without Python lists (a ListArray over the flat tokens) and the rows come back as flat
    tensors. Raises UsageError where TRL is not installed (`import_pack_dataset`)."""
    pack_dataset = import_pack_dataset()
    import datasets  # type: ignore[import-not-found, unused-ignore]
    import pyarrow as pa  # type: ignore[import-not-found, unused-ignore]
    from datasets.table import InMemoryTable  # type: ignore[import-not-found, unused-ignore]

    values = pa.array(corpus.tokens.numpy())
    offsets = corpus.offsets.numpy()
    list_type = pa.ListArray if int(offsets[-1]) < 2**31 else pa.LargeListArray
    documents = list_type.from_arrays(pa.array(offsets.astype(np.int32 if list_type is pa.ListArray else np.int64)),
                                      values)
    table = pa.table({"input_ids": documents})
    # fingerprints given, not hashed: datasets hashes a table with dill, which fails for some pyarrow versions (and
    # costs a pass over the corpus); nothing is cached to disk for an in-memory table anyway
    dataset = datasets.Dataset(InMemoryTable(table), fingerprint=f"memtune-corpus-{len(corpus)}")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # its "Map" bar on stderr for a second's work
    try:
        packed = pack_dataset(dataset, seq_length=seq_len, strategy="bfd",
                              map_kwargs={"new_fingerprint": f"memtune-bfd-{seq_len}"}).data.table
    finally:
        if bars:
            datasets.enable_progress_bars()
    rows = packed.column("input_ids").combine_chunks()
    lengths = packed.column("seq_lengths").combine_chunks()
    return PackedRowsDataset(
        tokens=_tensor(rows.values), row_offsets=_tensor(rows.offsets).long(),
        seq_lengths=_tensor(lengths.values).long(), length_offsets=_tensor(lengths.offsets).long(),
        seq_len=seq_len, source=corpus.source, num_tokens=int(corpus.tokens.numel()),
    )


def _tensor(array: Any) -> torch.Tensor:
    """An Arrow array's values as a tensor (a copy: Arrow's buffers are read-only)."""
    return torch.tensor(np.asarray(array.to_numpy(zero_copy_only=False)))


def iter_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of a JSON Lines / JSON / text file, or of every such file under a directory (name
    order), one at a time: a JSON Lines file is read line by line. Raises UsageError for a missing path, an empty
    directory or a malformed file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"data path '{path}' does not exist: "
                         "give a .jsonl, .json or .txt file, or a directory of them")
    if not path.is_dir():
        yield from _iter_file(path, text_field)
        return
    files = sorted(
        file for file in path.rglob("*")
        if file.is_file() and file.suffix.lower() in JSON_SUFFIXES + TEXT_SUFFIXES
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if not files:
        raise UsageError(f"data directory '{path}' holds no .jsonl, .json or .txt files: "
                         "put the training text there, or point --data at a file")
    for file in files:
        yield from _iter_file(file, text_field)


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents in a JSON Lines / JSON / text file, or in every such file under a directory (`iter_texts`)."""
    texts = list(iter_texts(path, text_field))
    if not texts:
        raise UsageError(f"data '{Path(path).expanduser()}' holds no text (every document is empty): "
                         "give a file with training text")
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
    packing: str = DEFAULT_PACKING,
) -> TrainingDataset:
    """Read and tokenise DATA (or the sample corpus) and batch it by `packing` at `seq_len` (module docstring):
    concat blocks, one document per row (none, padding-free) or TRL's bfd rows.

    `seq_len`: the plan's (`TrainConfig.seq_len`). A plan made with --data has the worst row's length there
    (`run.data_plan.DataPlan.row_tokens`), not the --seq-len it was asked for; cutting at it gives the same batches
    for the data planned: no document is longer than it in none and padding-free (the longest was cut at --seq-len),
    and BFD at a capacity F at or above every row's fill makes the same choices as at any larger capacity (each
    document goes to the fullest row it fits in; the rows it fits in are the same where no fill passes F). Data
    with longer documents is cut at it, so no batch is longer than the plan's.
    `vocab_size`: the model's; a token id at or above it is refused (wrong tokenizer for the model).
    Raises UsageError for bad data, too little of it for concat, an unknown packing, bfd without TRL.
    """
    check_packing(packing)
    if packing == "bfd":
        import_pack_dataset()  # TRL missing: UsageError before minutes of tokenising
    path = Path(data) if data is not None else SAMPLE_CORPUS_PATH
    corpus = tokenize_corpus(tokenizer, iter_texts(path, text_field), source=str(path))
    if len(corpus) == 0 or corpus.tokens.numel() == 0:
        raise UsageError(f"data '{path.expanduser()}' holds no text (every document is empty): "
                         "give a file with training text")
    tokens = corpus.tokens
    if packing == "concat" and tokens.numel() < seq_len:
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
    if packing == "concat":
        return PackedDataset(tokens, seq_len, source=str(path))
    if packing == "bfd":
        return pack_bfd(corpus, seq_len)
    return DocumentDataset(corpus, seq_len, packing)


def tokenize_corpus(tokenizer: Any, texts: Iterable[str], source: str = "",
                    chunk: int = TOKENIZE_CHUNK) -> TokenizedCorpus:
    """Every document's tokens (no special tokens, then the end-of-text token when the tokenizer has one) in one flat
    tensor with document offsets, tokenised `chunk` documents per call: only one chunk's ids are ever Python lists."""
    eos = tokenizer.eos_token_id
    pieces: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    batch: list[str] = []
    wide = False

    def flush() -> None:
        nonlocal wide
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        ids = [np.asarray(document + ([eos] if eos is not None else []), dtype=np.int64) for document in encoded]
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        wide = wide or bool(flat.size and flat.max() >= 2**31)
        pieces.append(flat)
        lengths.append(np.asarray([piece.size for piece in ids], dtype=np.int64))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    dtype = np.int64 if wide else np.int32
    tokens = np.concatenate([piece.astype(dtype) for piece in pieces]) if pieces else np.zeros(0, dtype=dtype)
    counts = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return TokenizedCorpus(torch.from_numpy(tokens), torch.from_numpy(offsets), source)


def tokenize(tokenizer: Any, texts: Iterable[str]) -> torch.Tensor:
    """All documents' tokens in one 1-D tensor, each document followed by the end-of-text token."""
    return tokenize_corpus(tokenizer, texts).tokens


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty documents of one file: a .txt is one document, a .json list is loaded whole, a JSON Lines file is
    read a line at a time."""
    suffix = path.suffix.lower()
    try:
        if suffix not in JSON_SUFFIXES:
            content = path.read_text(encoding="utf-8")
            if content.strip():
                yield content
            return
        with path.open(encoding="utf-8") as file:
            first = file.read(4096)
            if suffix == ".json" and first.lstrip().startswith("["):
                content = first + file.read()
                try:
                    records = json.loads(content)
                except json.JSONDecodeError as error:
                    raise UsageError(f"data file '{path}' is not valid JSON ({error}): "
                                     "fix it, or write one object per line (.jsonl)") from None
                for number, record in enumerate(records, 1):
                    if text := _text_of(record, text_field, path, f"item {number}"):
                        yield text
                return
            file.seek(0)
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"line {number} of '{path}' is not valid JSON ({error.msg}): "
                                     "JSON Lines needs one complete JSON object per line") from None
                if text := _text_of(record, text_field, path, f"line {number}"):
                    yield text
    except UnicodeDecodeError:
        raise UsageError(f"data file '{path}' is not UTF-8 text: "
                         "give JSON Lines (.jsonl), JSON or plain text (.txt)") from None


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
