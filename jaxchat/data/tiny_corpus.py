"""The embedded tiny corpus: synthetic English that a small GPT can learn from on a CPU in minutes.

This is *not* real web text. It is generated offline from templates and a hand-written vocabulary,
seeded and deterministic, and written in exactly the FineWeb shard format (one string column `text`,
row groups of 1024 documents, zstd level 3, no dictionary, no statistics) so the rest of jaxchat
cannot tell it from a downloaded dataset. Documents mix:

  * simple facts: capitals, chemical symbols, colors, animals, opposites, days and months, planets;
  * arithmetic written out ("17 plus 25 is 42.") and small linear equations ("If 5*x + 3 = 13, then x is 2.");
  * spellings ("The word cat is spelled c-a-t.");
  * short stories built from subjects, verbs, objects, adjectives and places;
  * occasional long multi-paragraph documents, so packing has something to crop.

The reference's sample prompts ("The capital of France is", "The chemical symbol of gold is",
"If yesterday was Friday, then tomorrow will be", "The opposite of hot is", "The planets of the solar
system are:", "If 5*x + 3 = 13, then x is") all have their answers in here, in those exact phrasings.

    python -m jaxchat.data.tiny_corpus          # writes $JAXCHAT_HOME/data/tiny/shard_0000{0..7}.parquet
"""
import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat import paths
from jaxchat.data.datasets import get_dataset, shard_name

ROW_GROUP_DOCS = 1024  # FineWeb shards: doc count is a multiple of the row-group size

# --- vocabulary ---------------------------------------------------------------------------------

CAPITALS = (  # country, capital, language, continent
    ("France", "Paris", "French", "Europe"), ("Germany", "Berlin", "German", "Europe"),
    ("Italy", "Rome", "Italian", "Europe"), ("Spain", "Madrid", "Spanish", "Europe"),
    ("Portugal", "Lisbon", "Portuguese", "Europe"), ("Greece", "Athens", "Greek", "Europe"),
    ("Poland", "Warsaw", "Polish", "Europe"), ("Sweden", "Stockholm", "Swedish", "Europe"),
    ("Norway", "Oslo", "Norwegian", "Europe"), ("Finland", "Helsinki", "Finnish", "Europe"),
    ("Ireland", "Dublin", "English", "Europe"), ("Austria", "Vienna", "German", "Europe"),
    ("Egypt", "Cairo", "Arabic", "Africa"), ("Kenya", "Nairobi", "Swahili", "Africa"),
    ("Nigeria", "Abuja", "English", "Africa"), ("Morocco", "Rabat", "Arabic", "Africa"),
    ("Japan", "Tokyo", "Japanese", "Asia"), ("China", "Beijing", "Chinese", "Asia"),
    ("India", "New Delhi", "Hindi", "Asia"), ("Thailand", "Bangkok", "Thai", "Asia"),
    ("Vietnam", "Hanoi", "Vietnamese", "Asia"), ("Turkey", "Ankara", "Turkish", "Asia"),
    ("Canada", "Ottawa", "English", "North America"), ("Mexico", "Mexico City", "Spanish", "North America"),
    ("Brazil", "Brasilia", "Portuguese", "South America"), ("Peru", "Lima", "Spanish", "South America"),
    ("Argentina", "Buenos Aires", "Spanish", "South America"), ("Chile", "Santiago", "Spanish", "South America"),
    ("Australia", "Canberra", "English", "Oceania"), ("Russia", "Moscow", "Russian", "Europe"),
)
ELEMENTS = (
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("copper", "Cu"), ("oxygen", "O"), ("hydrogen", "H"),
    ("carbon", "C"), ("nitrogen", "N"), ("helium", "He"), ("sodium", "Na"), ("potassium", "K"), ("lead", "Pb"),
    ("tin", "Sn"), ("zinc", "Zn"), ("calcium", "Ca"), ("mercury", "Hg"), ("sulfur", "S"), ("neon", "Ne"),
    ("uranium", "U"), ("chlorine", "Cl"), ("aluminum", "Al"), ("magnesium", "Mg"), ("platinum", "Pt"),
)
ANIMALS = (  # animal, sound, baby, legs, home
    ("cat", "meow", "kitten", 4, "house"), ("dog", "woof", "puppy", 4, "kennel"), ("cow", "moo", "calf", 4, "barn"),
    ("sheep", "baa", "lamb", 4, "field"), ("duck", "quack", "duckling", 2, "pond"), ("horse", "neigh", "foal", 4, "stable"),
    ("pig", "oink", "piglet", 4, "sty"), ("lion", "roar", "cub", 4, "den"), ("owl", "hoot", "owlet", 2, "tree"),
    ("frog", "croak", "tadpole", 4, "pond"), ("bee", "buzz", "larva", 6, "hive"), ("goat", "bleat", "kid", 4, "farm"),
    ("hen", "cluck", "chick", 2, "coop"), ("bear", "growl", "cub", 4, "cave"), ("mouse", "squeak", "pup", 4, "hole"),
    ("spider", "hiss", "spiderling", 8, "web"), ("snake", "hiss", "hatchling", 0, "burrow"), ("wolf", "howl", "pup", 4, "den"),
)
COLORS = (
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a strawberry", "red"), ("an orange", "orange"), ("a carrot", "orange"), ("a lemon", "yellow"),
    ("a tomato", "red"), ("the sun", "yellow"), ("milk", "white"), ("chocolate", "brown"), ("a leaf", "green"),
    ("an eggplant", "purple"), ("the ocean", "blue"), ("a crow", "black"), ("a flamingo", "pink"),
)
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("old", "young"),
    ("day", "night"), ("light", "dark"), ("open", "closed"), ("full", "empty"), ("wet", "dry"), ("hard", "soft"),
    ("tall", "short"), ("early", "late"), ("left", "right"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("thick", "thin"), ("heavy", "light"), ("inside", "outside"), ("yes", "no"), ("good", "bad"), ("near", "far"),
    ("clean", "dirty"), ("first", "last"), ("win", "lose"), ("push", "pull"), ("true", "false"), ("black", "white"),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PLANETS = ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth")
NAMES = ("Tom", "Lily", "Sam", "Anna", "Ben", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Ella", "Noah", "Ava",
         "Omar", "Sara", "Ravi", "Nina", "Hugo", "Ivy", "Kai", "Lena", "Finn", "Maya", "Theo", "Rosa", "Eli", "Iris")
ADJECTIVES = ("little", "big", "red", "blue", "green", "happy", "sleepy", "shiny", "old", "new", "funny", "kind",
              "brave", "quiet", "tiny", "huge", "soft", "bright", "small", "yellow", "clever", "gentle", "busy",
              "cold", "warm", "round", "tall", "heavy", "friendly", "curious", "lucky", "strange")
NOUNS = ("ball", "book", "kite", "apple", "box", "hat", "cup", "boat", "tree", "flower", "letter", "cake", "bike",
         "chair", "map", "key", "drum", "lamp", "shoe", "bag", "basket", "coin", "rock", "shell", "picture", "song",
         "garden", "window", "door", "bridge", "river", "hill", "sandwich", "blanket", "pencil", "clock", "train")
VERBS = (  # present, past
    ("find", "found"), ("see", "saw"), ("make", "made"), ("carry", "carried"), ("paint", "painted"),
    ("build", "built"), ("open", "opened"), ("lose", "lost"), ("share", "shared"), ("clean", "cleaned"),
    ("fix", "fixed"), ("draw", "drew"), ("hide", "hid"), ("throw", "threw"), ("catch", "caught"),
    ("buy", "bought"), ("bring", "brought"), ("read", "read"), ("hold", "held"), ("wash", "washed"),
)
PLACES = ("in the park", "at school", "by the river", "in the garden", "at the beach", "in the kitchen",
          "on the hill", "near the lake", "in the forest", "at the market", "in the library", "on the farm",
          "at home", "in the city", "under the bridge", "in the village")
TIMES = ("One day", "In the morning", "After lunch", "Later", "In the evening", "On Saturday", "Every morning",
         "Last week", "Yesterday", "At night", "Then", "Soon", "After school", "On a sunny day")
FEELINGS = ("happy", "excited", "tired", "proud", "surprised", "hungry", "calm", "glad", "sleepy", "curious")


# --- sentence generators: each takes a random.Random and returns one sentence (or a few) ---------

def _capital(r):
    country, city, lang, cont = r.choice(CAPITALS)
    return r.choice((
        f"The capital of {country} is {city}.",
        f"The capital of {country} is {city}.",
        f"{city} is the capital of {country}.",
        f"What is the capital of {country}? The capital of {country} is {city}.",
        f"{country} is a country in {cont}. The capital of {country} is {city}.",
        f"People in {country} speak {lang}. The capital of {country} is {city}.",
    ))


def _element(r):
    name, sym = r.choice(ELEMENTS)
    return r.choice((
        f"The chemical symbol of {name} is {sym}.",
        f"The chemical symbol of {name} is {sym}.",
        f"{sym} is the chemical symbol of {name}.",
        f"The symbol {sym} stands for {name}.",
    ))


def _animal(r):
    a, sound, baby, legs, home = r.choice(ANIMALS)
    article = "An" if a[0] in "aeiou" else "A"
    return r.choice((
        f"{article} {a} says {sound}.",
        f"A baby {a} is called {_a(baby)}.",
        f"{article} {a} has {legs} legs." if legs else f"{article} {a} has no legs.",
        f"{article} {a} lives in {_a(home)}.",
        f"The sound a {a} makes is {sound}.",
    ))


def _color(r):
    thing, color = r.choice(COLORS)
    return r.choice((f"The color of {thing} is {color}.", f"{thing[0].upper()}{thing[1:]} is {color}."))


def _opposite(r):
    a, b = r.choice(OPPOSITES)
    if r.random() < 0.5:
        a, b = b, a
    return r.choice((f"The opposite of {a} is {b}.", f"The opposite of {a} is {b}.",
                     f"{a[0].upper()}{a[1:]} is the opposite of {b}."))


def _day(r):
    i = r.randrange(7)
    d = lambda k: DAYS[(i + k) % 7]  # noqa: E731
    return r.choice((
        f"If yesterday was {d(0)}, then tomorrow will be {d(2)}.",
        f"If yesterday was {d(0)}, then tomorrow will be {d(2)}.",
        f"If today is {d(0)}, then tomorrow will be {d(1)}.",
        f"If today is {d(0)}, then yesterday was {d(-1)}.",
        f"If tomorrow is {d(0)}, then today is {d(-1)}.",
        f"The day after {d(0)} is {d(1)}.",
        f"The day before {d(0)} is {d(-1)}.",
        f"{d(0)} comes after {d(-1)} and before {d(1)}.",
    ))


def _month(r):
    i = r.randrange(12)
    return r.choice((
        f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}.",
        f"The month before {MONTHS[i]} is {MONTHS[i - 1]}.",
        f"{MONTHS[i]} is the {ORDINALS[i]} month of the year.",
        "There are twelve months in a year and seven days in a week.",
    ))


def _planet(r):
    i = r.randrange(8)
    listing = ", ".join(PLANETS[:-1]) + f", and {PLANETS[-1]}"
    return r.choice((
        f"The planets of the solar system are: {listing}.",
        f"{PLANETS[i]} is the {ORDINALS[i]} planet from the Sun.",
        "Jupiter is the largest planet in the solar system.",
        "Mercury is the planet closest to the Sun.",
        "There are eight planets in the solar system.",
        "We live on Earth, the third planet from the Sun.",
    ))


def _arithmetic(r):
    op = r.randrange(4)
    if op == 0:
        a, b = r.randrange(100), r.randrange(100)
        return r.choice((f"{a} plus {b} is {a + b}.", f"{a} + {b} = {a + b}.",
                         f"What is {a} plus {b}? {a} plus {b} is {a + b}."))
    if op == 1:
        a, b = r.randrange(100), r.randrange(100)
        a, b = max(a, b), min(a, b)
        return r.choice((f"{a} minus {b} is {a - b}.", f"{a} - {b} = {a - b}."))
    if op == 2:
        a, b = r.randrange(13), r.randrange(13)
        return r.choice((f"{a} times {b} is {a * b}.", f"{a} * {b} = {a * b}."))
    b, q = r.randrange(1, 13), r.randrange(13)
    return f"{b * q} divided by {b} is {q}."


def _equation(r):
    # The reference's sample prompt recurs often enough for a tiny model to memorize its answer.
    a, x, b = (5, 2, 3) if r.random() < 0.15 else (r.randrange(2, 10), r.randrange(13), r.randrange(1, 21))
    return r.choice((
        f"If {a}*x + {b} = {a * x + b}, then x is {x}.",
        f"If {a}*x + {b} = {a * x + b}, then x is {x}.",
        f"If x + {b} = {x + b}, then x is {x}.",
        f"If {a}*x = {a * x}, then x is {x}.",
        f"To solve {a}*x + {b} = {a * x + b}, subtract {b} to get {a}*x = {a * x}, so x is {x}.",
    ))


def _spelling(r):
    word = r.choice((r.choice(NOUNS), r.choice(ANIMALS)[0], r.choice(COLORS)[1], r.choice(ADJECTIVES)))
    return r.choice((
        f"The word {word} is spelled {'-'.join(word)}.",
        f"The word {word} is spelled {'-'.join(word)}.",
        f"The word {word} has {len(word)} letters.",
        f"The first letter of {word} is {word[0]}.",
    ))


def _counting(r):
    a = r.randrange(20)
    n = r.randrange(3, 8)
    return f"Counting from {a} to {a + n}: {', '.join(str(k) for k in range(a, a + n + 1))}."


FACTS = (_capital, _element, _animal, _color, _opposite, _day, _month, _planet, _spelling, _counting)
MATH = (_arithmetic, _arithmetic, _equation)


def _a(word):
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _story(r, n_sentences):
    """A little narrative about one character, so pronouns and names carry across sentences."""
    name = r.choice(NAMES)
    pron, poss = r.choice((("he", "his"), ("she", "her")))
    adj, noun = r.choice(ADJECTIVES), r.choice(NOUNS)
    out = [f"{r.choice(TIMES)}, {name} {r.choice(VERBS)[1]} {_a(adj)} {noun} {r.choice(PLACES)}."]
    for _ in range(n_sentences - 1):
        k = r.randrange(6)
        if k == 0:
            out.append(f"{pron.capitalize()} felt {r.choice(FEELINGS)}.")
        elif k == 1:
            friend = r.choice([n for n in NAMES if n != name])
            out.append(f"{name} and {friend} {r.choice(VERBS)[1]} the {noun} {r.choice(PLACES)}.")
        elif k == 2:
            out.append(f"The {noun} was {r.choice(ADJECTIVES)} and {r.choice(ADJECTIVES)}.")
        elif k == 3:
            out.append(f"{r.choice(TIMES)}, {pron} {r.choice(VERBS)[1]} {poss} {r.choice(ADJECTIVES)} {r.choice(NOUNS)}.")
        elif k == 4:
            v = r.choice(VERBS)[0]
            out.append(f'"I want to {v} the {noun}," said {name}.')
        else:
            out.append(r.choice(FACTS)(r))  # characters learn things too
    return " ".join(out)


def _lesson(r):
    """A paragraph about one topic, the way an encyclopedia would put it."""
    k = r.randrange(4)
    if k == 0:
        country, city, lang, cont = r.choice(CAPITALS)
        return (f"{country} is a country in {cont}. The capital of {country} is {city}. "
                f"People in {country} speak {lang}. {city} is the largest city in {country}."
                if r.random() < 0.3 else
                f"{country} is a country in {cont}. The capital of {country} is {city}. People in {country} speak {lang}.")
    if k == 1:
        a, sound, baby, legs, home = r.choice(ANIMALS)
        return (f"The {a} is an animal. {_a(a).capitalize()} says {sound}. A baby {a} is called {_a(baby)}. "
                f"{_a(a).capitalize()} has {legs} legs and lives in {_a(home)}.")
    if k == 2:
        return " ".join(_planet(r) for _ in range(r.randrange(2, 5)))
    return " ".join(_day(r) for _ in range(r.randrange(2, 5)))


def _paragraph(r):
    k = r.random()
    if k < 0.35:
        return _story(r, r.randrange(2, 9))
    if k < 0.55:
        return " ".join(r.choice(FACTS)(r) for _ in range(r.randrange(2, 8)))
    if k < 0.75:
        return " ".join(r.choice(MATH)(r) for _ in range(r.randrange(2, 8)))
    if k < 0.9:
        return _lesson(r)
    return " ".join(_spelling(r) for _ in range(r.randrange(2, 6)))


def document(r: random.Random) -> str:
    """One document: usually one short paragraph, sometimes a few, rarely a long multi-page one."""
    k = r.random()
    n = 1 if k < 0.6 else r.randrange(2, 5) if k < 0.95 else r.randrange(15, 40)
    return "\n\n".join(_paragraph(r) for _ in range(n))


# --- shards ---------------------------------------------------------------------------------------

def shard_documents(seed: int, index: int, chars: int) -> list[str]:
    """Docs for one shard: at least `chars` characters, doc count a multiple of ROW_GROUP_DOCS.

    Each shard has its own RNG stream, so a shard's content never depends on the others.
    """
    r = random.Random(f"jaxchat-tiny:{seed}:{index}")
    docs, total = [], 0
    while total < chars or len(docs) % ROW_GROUP_DOCS:
        docs.append(document(r))
        total += len(docs[-1])
    return docs


def write_shard(docs: list[str], path: Path) -> None:
    """Write docs in the FineWeb shard format, atomically (tmp file, then rename)."""
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_DOCS, compression="zstd", compression_level=3,
                   use_dictionary=False, write_statistics=False)
    tmp.replace(path)


def generate(out_dir: Path | str | None = None, seed: int = 0, num_shards: int = 8,
             chars_per_shard: int = 900_000) -> list[Path]:
    """Write `num_shards` shards (the last is the pinned validation shard) and return their paths."""
    out = Path(out_dir) if out_dir is not None else paths.data_dir("tiny")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(num_shards):
        path = out / shard_name(i)
        write_shard(shard_documents(seed, i, chars_per_shard), path)
        written.append(path)
    return written


def ensure_tiny_corpus(out_dir: Path | str | None = None) -> list[Path]:
    """Generate the corpus unless every shard of the `tiny` dataset is already there."""
    out = Path(out_dir) if out_dir is not None else paths.data_dir("tiny")
    expected = [out / shard_name(i) for i in range(get_dataset("tiny").num_shards)]
    if all(p.exists() for p in expected):
        return expected
    return generate(out, num_shards=len(expected))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=None, help="default: $JAXCHAT_HOME/data/tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-shards", type=int, default=get_dataset("tiny").num_shards)
    ap.add_argument("--chars-per-shard", type=int, default=900_000)
    args = ap.parse_args(argv)
    written = generate(args.out_dir, args.seed, args.num_shards, args.chars_per_shard)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} shards ({total / 1e6:.2f} MB) to {written[0].parent}")


if __name__ == "__main__":
    main()
