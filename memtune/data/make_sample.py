"""Regenerate the sample corpus and tokenizer shipped in this folder (no download, deterministic).

    python memtune/data/make_sample.py

- `sample_corpus.jsonl`: about 350 KB of plain English in JSON Lines (`{"text": ...}` per line),
  written by this script from a small grammar: short stories of a village and its people, market
  scenes, weather, travel, dialogues, counting, arithmetic and calendar facts. It has enough
  structure for a language model's loss to fall visibly within a few hundred steps, and it is free
  of any licence (generated, not copied).
- `tokenizer.json`: a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, so any text encodes),
  trained with the `tokenizers` library on that corpus: 256 bytes, 2 special tokens and the merges
  the corpus supports (1,156 entries in all; VOCAB_SIZE is only an upper bound). `memtune run` uses it
  when the model comes without a tokenizer (catalog names, bare configs); its ids fit every model's
  vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS_PATH = HERE / "sample_corpus.jsonl"
TOKENIZER_PATH = HERE / "tokenizer.json"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]
SEED = 20240611
TARGET_BYTES = 350_000

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas", "Kate", "Leo",
         "Maria", "Noah", "Olga", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Yusuf", "Zoe", "Martin"]
PLACES = ["market", "bakery", "library", "harbour", "school", "station", "garden", "mill", "bridge", "forest",
          "river", "farm", "church", "square", "hill", "lake", "workshop", "inn"]
ANIMALS = ["dog", "cat", "horse", "goat", "fox", "owl", "duck", "sheep", "crow", "rabbit", "cow", "mouse"]
OBJECTS = ["basket", "lamp", "book", "letter", "coat", "hammer", "kettle", "map", "rope", "boat", "cart", "key",
           "bell", "clock", "wheel", "ladder", "blanket", "candle"]
FOODS = ["apples", "bread", "cheese", "eggs", "fish", "honey", "milk", "onions", "pears", "potatoes", "plums",
         "beans", "carrots", "butter", "flour", "salt"]
ADJECTIVES = ["old", "small", "quiet", "bright", "heavy", "warm", "cold", "green", "red", "brown", "tall",
              "narrow", "wide", "clean", "busy", "empty", "new", "wooden"]
WEATHER = ["rain", "snow", "wind", "fog", "sunshine", "frost", "a storm", "a light drizzle"]
FEELINGS = ["happy", "tired", "worried", "glad", "hungry", "curious", "calm", "surprised", "proud", "sleepy"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SEASONS = {"winter": ["December", "January", "February"], "spring": ["March", "April", "May"],
           "summer": ["June", "July", "August"], "autumn": ["September", "October", "November"]}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
TIMES = ["early in the morning", "at noon", "in the afternoon", "in the evening", "late at night", "before dawn"]
JOBS = {"baker": "bakes bread", "miller": "grinds flour", "fisher": "catches fish", "teacher": "teaches children",
        "smith": "mends tools", "farmer": "grows vegetables", "carpenter": "builds tables", "guard": "watches the gate",
        "doctor": "helps the sick", "weaver": "makes cloth"}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence_story(rng: random.Random, name: str, friend: str) -> str:
    place, other = rng.sample(PLACES, 2)
    adjective, animal, thing = rng.choice(ADJECTIVES), rng.choice(ANIMALS), rng.choice(OBJECTS)
    food, feeling, time = rng.choice(FOODS), rng.choice(FEELINGS), rng.choice(TIMES)
    count = rng.randint(2, 12)
    options = [
        f"{name} walked to the {place} {time}.",
        f"On the way, {name} saw {_a(adjective)} {animal} near the {other}.",
        f"{name} carried {_a(thing)} and a bag of {food}.",
        f"At the {place}, {name} met {friend}, who looked {feeling}.",
        f'"Good day, {friend}," said {name}. "Where are you going?"',
        f'"I am going to the {other}," answered {friend}. "I need {NUMBERS[count]} {rng.choice(OBJECTS)}s."',
        f"They talked for a while about the {rng.choice(WEATHER)} and the price of {food}.",
        f"{friend} had lost {_a(thing)}, so {name} helped to look for it.",
        f"They found it under {_a(adjective)} {rng.choice(OBJECTS)} behind the {place}.",
        f"The {animal} followed them all the way to the {other}.",
        f"When the sun went down, {name} went home and felt {feeling}.",
        f"{name} bought {NUMBERS[count]} pounds of {food} and paid with {NUMBERS[rng.randint(1, 9)]} coins.",
        f"The {place} was {rng.choice(ADJECTIVES)} and "
        f"{rng.choice(['full of people', 'almost empty', 'very loud', 'quiet'])}.",
    ]
    return " ".join(rng.sample(options, rng.randint(5, 9)))


def _market(rng: random.Random) -> str:
    seller, buyer = rng.sample(NAMES, 2)
    lines = [f"It was {rng.choice(DAYS)}, and the market in the square was open."]
    for _ in range(rng.randint(3, 6)):
        food = rng.choice(FOODS)
        count, price = rng.randint(1, 10), rng.randint(1, 9)
        total = count * price
        if total <= 20:
            lines.append(f"{buyer} asked for {NUMBERS[count]} of the {food}. \"That is {NUMBERS[price]} coins each,\" "
                         f"said {seller}, \"so {NUMBERS[count]} cost {NUMBERS[total]} coins.\"")
        else:
            lines.append(f"{buyer} looked at the {food}, but they were too expensive today.")
    lines.append(f"{seller} packed the rest into {_a(rng.choice(ADJECTIVES))} basket and closed the stall "
                 f"{rng.choice(TIMES)}.")
    return " ".join(lines)


def _arithmetic(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(4, 8)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        if rng.random() < 0.5:
            facts.append(f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
        elif a >= b:
            facts.append(f"{NUMBERS[a].capitalize()} minus {NUMBERS[b]} is {NUMBERS[a - b]}.")
        elif a * b <= 20:
            facts.append(f"{NUMBERS[a].capitalize()} times {NUMBERS[b]} is {NUMBERS[a * b]}.")
        else:
            facts.append(f"{NUMBERS[b].capitalize()} is more than {NUMBERS[a]}.")
    start = rng.randint(0, 12)
    facts.append("Counting on: " + ", ".join(NUMBERS[start:start + rng.randint(4, 8)]) + ".")
    return " ".join(facts)


def _calendar(rng: random.Random) -> str:
    day = rng.randrange(7)
    month = rng.randrange(12)
    season = next(name for name, months in SEASONS.items() if MONTHS[month] in months)
    sentences = [
        f"After {DAYS[day]} comes {DAYS[(day + 1) % 7]}, and before it comes {DAYS[day - 1]}.",
        f"The month after {MONTHS[month]} is {MONTHS[(month + 1) % 12]}.",
        f"{MONTHS[month]} is in {season}.",
        f"In {season} the village often has {rng.choice(WEATHER)}.",
        "A week has seven days and a year has twelve months.",
        "The days of the week are " + ", ".join(DAYS[:-1]) + f" and {DAYS[-1]}.",
    ]
    return " ".join(rng.sample(sentences, rng.randint(3, 5)))


def _weather(rng: random.Random) -> str:
    place, name = rng.choice(PLACES), rng.choice(NAMES)
    weather = rng.choice(WEATHER)
    return " ".join([
        f"In the morning there was {weather} over the {place}.",
        f"{name} looked out of the window and put on {_a(rng.choice(ADJECTIVES))} coat.",
        rng.choice([f"By noon the {weather} had stopped and the sky was clear.",
                    f"The {weather} lasted all day, and nobody went to the {rng.choice(PLACES)}.",
                    f"The children played by the {rng.choice(PLACES)} in spite of the {weather}."]),
        f"The {rng.choice(ANIMALS)} stayed in the barn, and the {rng.choice(ANIMALS)} slept by the fire.",
    ])


def _people(rng: random.Random) -> str:
    sentences = []
    for name, job in zip(rng.sample(NAMES, 4), rng.sample(list(JOBS), 4), strict=True):
        sentences.append(f"{name} is the {job} of the village. The {job} {JOBS[job]}.")
        sentences.append(f"Every {rng.choice(DAYS)}, {name} goes to the {rng.choice(PLACES)}.")
    return " ".join(sentences)


def _travel(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    stops = rng.sample(PLACES, 4)
    hours = rng.randint(1, 6)
    return " ".join([
        f"{name} left home {rng.choice(TIMES)} with {_a(rng.choice(OBJECTS))} and some {rng.choice(FOODS)}.",
        f"The road went past the {stops[0]}, over the {stops[1]} and along the {stops[2]}.",
        f"After {NUMBERS[hours]} hour{'s' if hours > 1 else ''}, {name} reached the {stops[3]}.",
        f"There {name} rested, drank some {rng.choice(['water', 'milk', 'tea'])} and wrote a letter home.",
        f"\"The journey was long but {rng.choice(['pleasant', 'easy', 'cold', 'wet', 'quiet'])},\" wrote {name}.",
    ])


def generate_corpus(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> list[str]:
    rng = random.Random(seed)
    kinds = [_market, _arithmetic, _calendar, _weather, _people, _travel]
    documents: list[str] = []
    size = 0
    while size < target_bytes:
        if rng.random() < 0.4:
            name, friend = rng.sample(NAMES, 2)
            paragraphs = [_sentence_story(rng, name, friend) for _ in range(rng.randint(1, 3))]
            text = "\n\n".join(paragraphs)
        else:
            text = rng.choice(kinds)(rng)
        documents.append(text)
        size += len(text.encode()) + 12
    return documents


def train_tokenizer(documents: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def main() -> None:
    documents = generate_corpus()
    with CORPUS_PATH.open("w") as file:
        for text in documents:
            file.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_tokenizer(documents)
    tokenizer.save(str(TOKENIZER_PATH))
    print(f"{CORPUS_PATH}: {len(documents)} documents, {CORPUS_PATH.stat().st_size} bytes")
    print(f"{TOKENIZER_PATH}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
