"""Built-in demo data: generated instruction tasks with exact answers.

Five families (arithmetic word problems, unit conversion, list transformations, string
transformations, formatting), rows in Alpaca shape. Answers are short and exact, so the
gain from fine-tuning is measurable by exact match. Generation is seeded: the same seed
gives the same rows; the training and evaluation sets use disjoint seeds.
"""

from __future__ import annotations

import random

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cards", "shells"]
WORDS = ["river", "garden", "silver", "planet", "window", "coffee", "market", "pocket", "yellow", "bridge",
         "camera", "forest", "butter", "rocket", "island", "pepper"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def arithmetic(r: random.Random) -> dict:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(5, 60), r.randint(2, 40)
    kind = r.randrange(3)
    if kind == 0:
        q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == 1:
        a = a + b
        q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    else:
        a, b = r.randint(2, 12), r.randint(2, 9)
        q, ans = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?", a * b
    return {"instruction": "Solve the word problem. Answer with the number only.", "input": q, "output": str(ans)}


def conversion(r: random.Random) -> dict:
    unit, factor, to = r.choice([("kilometers", 1000, "meters"), ("meters", 100, "centimeters"),
                                 ("hours", 60, "minutes"), ("minutes", 60, "seconds"),
                                 ("kilograms", 1000, "grams"), ("liters", 1000, "milliliters")])
    n = r.randint(2, 30)
    return {"instruction": f"Convert to {to}. Answer with the number only.", "input": f"{n} {unit}",
            "output": str(n * factor)}


def lists(r: random.Random) -> dict:
    xs = r.sample(range(1, 100), r.randint(3, 6))
    op = r.randrange(4)
    if op == 0:
        ins, out = "Sort the numbers in ascending order.", ", ".join(map(str, sorted(xs)))
    elif op == 1:
        ins, out = "Reverse the order of the list.", ", ".join(map(str, xs[::-1]))
    elif op == 2:
        ins, out = "Give the largest number in the list.", str(max(xs))
    else:
        ins, out = "Give the sum of the numbers.", str(sum(xs))
    return {"instruction": ins, "input": ", ".join(map(str, xs)), "output": out}


def strings(r: random.Random) -> dict:
    ws = r.sample(WORDS, r.randint(2, 4))
    op = r.randrange(4)
    if op == 0:
        ins, out = "Write the words in uppercase.", " ".join(ws).upper()
    elif op == 1:
        ins, out = "Join the words with hyphens.", "-".join(ws)
    elif op == 2:
        ins, out = "Give the first letter of each word, as one string.", "".join(w[0] for w in ws)
    else:
        ins, out = "Count the words.", str(len(ws))
    return {"instruction": ins, "input": " ".join(ws), "output": out}


def formatting(r: random.Random) -> dict:
    y, m, d = r.randint(1990, 2030), r.randint(1, 12), r.randint(1, 28)
    op = r.randrange(3)
    if op == 0:
        ins, inp, out = "Rewrite the date as DD/MM/YYYY.", f"{y}-{m:02d}-{d:02d}", f"{d:02d}/{m:02d}/{y}"
    elif op == 1:
        ins, inp, out = "Write the date in words as Month D, YYYY.", f"{y}-{m:02d}-{d:02d}", f"{MONTHS[m - 1]} {d}, {y}"
    else:
        name, age = r.choice(NAMES), r.randint(18, 90)
        ins, inp, out = ("Write the record as JSON with keys name and age.", f"name {name}, age {age}",
                         f'{{"name": "{name}", "age": {age}}}')
    return {"instruction": ins, "input": inp, "output": out}


FAMILIES = {"arithmetic": arithmetic, "conversion": conversion, "lists": lists, "strings": strings,
            "formatting": formatting}


def demo_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows cycling through the families (each row also names its family in `task`)."""
    r = random.Random(f"slimtune-demo-{seed}")
    rows = []
    for i in range(n):
        fam = list(FAMILIES)[i % len(FAMILIES)]
        rows.append({**FAMILIES[fam](r), "task": fam})
    return rows


TRAIN_SEED, EVAL_SEED = 0, 1


def demo_split(n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Training and evaluation rows from disjoint seeds; evaluation rows that also occur
    in training are replaced, so exact match measures generalisation, not recall."""
    train = demo_rows(n_train, TRAIN_SEED)
    seen = {(t["instruction"], t["input"]) for t in train}
    evals, k = [], 0
    while len(evals) < n_eval:
        batch = demo_rows(n_eval * 2, EVAL_SEED + 1000 * k)
        evals += [e for e in batch if (e["instruction"], e["input"]) not in seen][: n_eval - len(evals)]
        k += 1
    return train, evals
