"""A training corpus with a long-tailed length distribution, made from memtune's shipped sample (no download).

    python -m benchmarks.make_longtail --out benchmarks/results/longtail.jsonl            # 4,000 documents
    python -m benchmarks.make_longtail --documents 200 --seed 7 --out /tmp/small.jsonl

Real fine-tuning text is long-tailed: most documents are short, a few are many times longer (chat turns, code
files, papers). `memtune plan|fit --data` plans for the worst batch of such data (`memtune/run/data_plan.py`), so
the GPU benchmark of issue 16 needs a corpus whose longest documents are far above its median.

How it is made (deterministic for a given --seed, the same on every machine: `random.Random`, no numpy):
- each document's target length in characters is drawn from a log-normal distribution, median MEDIAN_CHARS and
  sigma SIGMA (so p90 ~ 3.6x, p99 ~ 16x the median), clipped to [MIN_CHARS, MAX_CHARS];
- its text is consecutive documents of memtune/data/sample_corpus.jsonl (from a random start, wrapping around),
  joined with spaces and cut at the last word boundary before the target length.
With the sample's tokenizer (~2.3 characters per token) the median document is ~300 tokens and the longest few
~8,000; with GPT-2's or Llama's (~4 characters per token), ~150 and ~5,000.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "memtune" / "data" / "sample_corpus.jsonl"
SEED = 16
DOCUMENTS = 4000
MEDIAN_CHARS = 700
SIGMA = 1.2
"""Log-normal sigma of the length in characters: the tail's weight (p99 / median = exp(2.326 x sigma))."""
MIN_CHARS = 40
MAX_CHARS = 20_000


def sample_texts(path: Path = SAMPLE_PATH) -> list[str]:
    """The shipped sample corpus's documents, in file order."""
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_documents(count: int = DOCUMENTS, seed: int = SEED, *, median_chars: int = MEDIAN_CHARS,
                   sigma: float = SIGMA, max_chars: int = MAX_CHARS) -> list[str]:
    """`count` documents of log-normal length (characters; module docstring), deterministic for `seed`."""
    rng = random.Random(seed)
    texts = sample_texts()
    documents = []
    for _ in range(count):
        target = int(min(max_chars, max(MIN_CHARS, math.exp(rng.gauss(math.log(median_chars), sigma)))))
        index = rng.randrange(len(texts))
        pieces: list[str] = []
        size = 0
        while size < target:
            pieces.append(texts[index % len(texts)])
            size += len(pieces[-1]) + 1
            index += 1
        text = " ".join(pieces)[:target]
        cut = text.rfind(" ")
        documents.append(text[:cut] if cut > target // 2 else text)
    return documents


def write_jsonl(documents: list[str], path: str | Path) -> Path:
    """The documents as JSON Lines ({"text": ...} per line), the format `memtune --data` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/longtail.jsonl", help="the JSON Lines file to write")
    parser.add_argument("--documents", type=int, default=DOCUMENTS, help="documents to write")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (the same seed gives the same file)")
    args = parser.parse_args()
    documents = make_documents(args.documents, args.seed)
    path = write_jsonl(documents, args.out)
    lengths = sorted(len(text) for text in documents)
    print(f"{path}: {len(documents)} documents, characters p50 {lengths[len(lengths) // 2]}, "
          f"p99 {lengths[int(0.99 * (len(lengths) - 1))]}, max {lengths[-1]}")


if __name__ == "__main__":
    main()
