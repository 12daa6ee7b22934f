"""Regenerate the small TRL datasets shipped in this folder from the sample corpus (no download, deterministic).

    python memtune/data/make_trl_data.py

- `sample_instructions.jsonl`: SFTTrainer's prompt-completion format (`{"prompt": ..., "completion": ...}`): each
  document of `sample_corpus.jsonl` split after its first sentence, the rest being the completion.
- `sample_preferences.jsonl`: DPOTrainer's explicit-prompt preference format (`{"prompt", "chosen", "rejected"}`):
  the same prompt, its own document's continuation as chosen, and the continuation of another document, cut to the
  same number of words, as rejected (an off-topic answer: a preference a model can learn within a few steps).

`memtune run --trainer sft|dpo` trains on them when no --data is given.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS_PATH = HERE / "sample_corpus.jsonl"
INSTRUCTIONS_PATH = HERE / "sample_instructions.jsonl"
PREFERENCES_PATH = HERE / "sample_preferences.jsonl"
SEED = 20261201
EXAMPLES = 400
"""Rows of each file (the corpus has more documents than that)."""


def split_document(text: str) -> tuple[str, str] | None:
    """(first sentence, the rest) of a document, or None when it has a single sentence."""
    end = text.find(". ")
    if end < 0:
        return None
    return text[:end + 1], " " + text[end + 2:]


def make(corpus: Path = CORPUS_PATH, examples: int = EXAMPLES) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(instruction rows, preference rows) from the documents of `corpus`, deterministic (SEED)."""
    rng = random.Random(SEED)
    documents = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    pairs = [pair for text in documents if (pair := split_document(text)) is not None][:examples]
    instructions = [{"prompt": prompt, "completion": completion} for prompt, completion in pairs]
    preferences = []
    for index, (prompt, completion) in enumerate(pairs):
        other = pairs[(index + rng.randrange(1, len(pairs))) % len(pairs)][1]
        words = len(completion.split())
        preferences.append({"prompt": prompt, "chosen": completion,
                            "rejected": " " + " ".join(other.split()[:words])})
    return instructions, preferences


def main() -> None:
    instructions, preferences = make()
    for path, rows in ((INSTRUCTIONS_PATH, instructions), (PREFERENCES_PATH, preferences)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
