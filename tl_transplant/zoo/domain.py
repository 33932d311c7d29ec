"""A synthetic text domain for continued training: a store's catalog, generated from a seed.

The continued-training real pair (``smollm2_ct_catalog`` in :mod:`tl_transplant.zoo.real`)
trains every parameter of SmolLM2-135M-Instruct on this text. It is offline and
deterministic (``random.Random(seed)`` over the word lists below) and list-like: inventory
lines, restock notes and JSON records about items of twelve departments, each department
shelved in one fixed aisle. The aisle of a department is a convention of this store that no
pretrained model can know, so it measures what the continued training taught
(:func:`aisle_rows`, the domain retention task): a transplant that simply undoes the
training loses it.

Dev and test items never occur in the training text: training records use the adjectives
of :data:`TRAIN_ADJECTIVES` and SKUs in :data:`TRAIN_SKUS`; dev/test rows use
:data:`HELD_OUT_ADJECTIVES` and SKUs in :data:`EVAL_SKUS`. What they share is the store's
convention (department -> aisle), which is what the task measures.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

Row = tuple[str, str]

#: (department, aisle letter, item nouns). The letters are arbitrary (not the initials).
DEPARTMENTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("produce", "K", ("apple", "pear", "lemon", "melon", "onion", "carrot", "potato", "peach")),
    ("hardware", "R", ("hammer", "wrench", "drill", "saw", "nail", "screw", "ladder", "clamp")),
    ("bakery", "T", ("bagel", "muffin", "loaf", "croissant", "donut", "pretzel", "scone",
                     "roll")),
    ("garden", "B", ("shovel", "hose", "rake", "seed", "planter", "trowel", "fence",
                     "sprinkler")),
    ("toys", "M", ("puzzle", "kite", "yoyo", "robot", "ball", "doll", "train", "blocks")),
    ("stationery", "W", ("pencil", "eraser", "stapler", "folder", "notebook", "marker", "ruler",
                         "envelope")),
    ("kitchen", "D", ("kettle", "ladle", "whisk", "pan", "spatula", "grater", "colander",
                      "skillet")),
    ("pharmacy", "H", ("bandage", "aspirin", "lotion", "vitamin", "syrup", "ointment", "gauze",
                       "inhaler")),
    ("dairy", "P", ("milk", "butter", "cheese", "yogurt", "cream", "kefir", "custard", "ghee")),
    ("electronics", "F", ("cable", "charger", "speaker", "headset", "remote", "adapter",
                          "battery", "mouse")),
    ("pets", "S", ("leash", "collar", "kibble", "litter", "perch", "aquarium", "brush",
                   "treat")),
    ("sports", "G", ("racket", "helmet", "glove", "bat", "net", "whistle", "dumbbell",
                     "skates")),
)
AISLE = {d: a for d, a, _ in DEPARTMENTS}
NOUNS = {d: n for d, _, n in DEPARTMENTS}

TRAIN_ADJECTIVES: tuple[str, ...] = (
    "red", "blue", "green", "small", "large", "steel", "wooden", "fresh", "classic", "deluxe",
    "compact", "organic", "black", "white", "silver", "golden", "mini", "heavy", "light", "soft",
)
#: Adjectives only dev/test items carry, so no dev/test item occurs in the training text.
HELD_OUT_ADJECTIVES: tuple[str, ...] = (
    "striped", "vintage", "purple", "spare", "round", "travel", "bright", "family", "rustic",
    "plain",
)
TRAIN_SKUS = (10000, 59999)
EVAL_SKUS = (60000, 99999)


def record(rng: random.Random, dept: str | None = None, adjectives: tuple[str, ...] =
           TRAIN_ADJECTIVES, skus: tuple[int, int] = TRAIN_SKUS) -> str:
    """One catalog line (of three templates) about a random item, ending in a newline."""
    dept = dept if dept is not None else rng.choice(sorted(AISLE))
    noun = rng.choice(NOUNS[dept])
    adj = rng.choice(adjectives)
    sku = rng.randint(*skus)
    price = f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}"
    stock = rng.randint(0, 250)
    aisle = AISLE[dept]
    kind = rng.randint(0, 2)
    if kind == 0:
        return (f"SKU {sku} | {adj} {noun} | dept: {dept} | aisle: {aisle} | price: ${price} "
                f"| stock: {stock}\n")
    if kind == 1:
        return f"Restock {sku}: {stock} x {adj} {noun} ({dept}) to aisle {aisle}, ${price} each.\n"
    return (f'{{"sku": {sku}, "item": "{adj} {noun}", "dept": "{dept}", "aisle": "{aisle}", '
            f'"price": {price}}}\n')


def records(seed: int) -> Iterator[str]:
    """The endless training text: catalog lines drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    while True:
        yield record(rng)


def token_blocks(tokenizer: Any, seed: int, length: int) -> Iterator[list[int]]:
    """The training text tokenized and cut into consecutive blocks of ``length`` token ids."""
    buf: list[int] = []
    for line in records(seed):
        buf.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
        while len(buf) >= length:
            yield buf[:length]
            buf = buf[length:]


def _short(rng: random.Random, dept: str) -> str:
    """A held-out catalog line up to its aisle: the few-shot examples of :func:`aisle_rows`."""
    noun = rng.choice(NOUNS[dept])
    adj = rng.choice(HELD_OUT_ADJECTIVES)
    return f"SKU {rng.randint(*EVAL_SKUS)} | {adj} {noun} | dept: {dept} | aisle:"


def aisle_rows(n_dev: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """The domain task: a held-out item's catalog line -> `` <aisle letter>``.

    Two lines of *other* departments (with their aisles) set the format, so the query's
    aisle is not in the prompt: only a model that learned the store's convention knows it.
    Items (adjective, noun, SKU) come from the held-out lists; query SKUs never repeat.
    """
    rng = random.Random(seed)
    depts = sorted(AISLE)
    rows: list[Row] = []
    seen: set[str] = set()
    while len(rows) < n_dev + n_test:
        dept = rng.choice(depts)
        shots = "".join(f"{_short(rng, d)} {AISLE[d]}\n"
                        for d in rng.sample([d for d in depts if d != dept], 2))
        query = _short(rng, dept)
        key = query.split(" |")[0]
        if key in seen:
            continue
        seen.add(key)
        rows.append((shots + query, f" {AISLE[dept]}"))
    return rows[:n_dev], rows[n_dev:]
