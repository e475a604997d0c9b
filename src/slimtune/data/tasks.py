"""A task family for gisting: does a gist carry the instruction?

Gisting (Mu, Li, Goodman 2023) compresses an instruction into k gist tokens; the input and the
answer see the instruction only through them. These tasks make that measurable. 36 small
transformations of three input kinds (3-6 common words; 3-6 numbers 0-99; one number 0-999),
each with 5 wordings of its instruction, answers computed by code, so exact match is exact.
Many tasks share an input kind, so the same input has different answers under different tasks:
without the instruction the answer cannot be known, and a gist that loses it shows.

Two-step tasks compose two of them ("Reverse the order of the words. Then, on the result: Write
the words in uppercase."): the first step's output is an input of the second's kind. Some
compositions are trained, so composing is a trained skill; others (NOVEL) are never trained,
though each of their steps is trained in the same role in a trained composition.

Splits, each a list of Alpaca rows {"instruction", "input", "output", "task"}:
    train   the trained wordings (the first 4) of the single tasks and the trained compositions
    seen    the same tasks and wordings, on new inputs
    unseen  the same tasks, in their held-out wording (the 5th; a composition's holds out its
            frame and uses its steps' held-out wordings), on new inputs
    novel   the held-out compositions, in trained frames and trained step wordings, on new inputs
"New inputs": every input is on one side of a seeded hash partition, so no input of an
evaluation split occurs in train under any task. Generation is seeded: the same seed gives the
same rows, another seed other rows.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

TRAINED = 4  # wordings[:TRAINED] are trained; the rest are held out (the `unseen` split)
COMPOSED_SHARE = 0.3  # share of training rows drawn from the trained compositions
EVAL_SIDE = 5  # one input in EVAL_SIDE (by hash) is kept for evaluation, never trained on
SPLITS = ("train", "seen", "unseen", "novel")

VOCAB = ["apple", "bird", "blue", "book", "bread", "cake", "car", "cat", "chair", "cloud", "coat", "cold",
         "desk", "dog", "door", "egg", "fish", "floor", "game", "gold", "green", "hat", "house", "king",
         "lamp", "leaf", "lemon", "milk", "moon", "music", "night", "ocean", "paper", "pen", "queen", "rain",
         "river", "road", "salt", "ship", "snow", "star", "stone", "sun", "table", "tiger", "tree", "water",
         "wind", "wolf", "yellow", "zebra"]  # lowercase; every word has a vowel and a consonant
VOWELS = "aeiou"


@dataclass(frozen=True)
class Task:
    """One transformation: its instruction's wordings, the kind of input it reads, the kind of
    output it gives (an input kind, so that another task can read it, or "text"), and the
    function from input string to answer string."""

    name: str
    wordings: tuple[str, ...]
    kind: str  # "words" | "numbers" | "number"
    gives: str  # "words" | "numbers" | "number" | "text"
    fn: Callable[[str], str]

    @property
    def trained(self) -> tuple[str, ...]:
        return self.wordings[:TRAINED]

    @property
    def held(self) -> tuple[str, ...]:
        return self.wordings[TRAINED:]


# Inputs, and the functions' view of them. Words are joined by spaces, numbers by ", ".

def _with_repeat(r: random.Random, xs: list) -> list:
    """Half the time one element repeats an earlier one, so that removing duplicates matters."""
    if r.random() < 0.5:
        i, j = sorted(r.sample(range(len(xs)), 2))
        xs[j] = xs[i]
    return xs


def words_input(r: random.Random) -> str:
    return " ".join(_with_repeat(r, r.sample(VOCAB, r.randint(3, 6))))


def numbers_input(r: random.Random) -> str:
    return ", ".join(map(str, _with_repeat(r, r.sample(range(100), r.randint(3, 6)))))


def number_input(r: random.Random) -> str:
    low, high = r.choice([(0, 19), (20, 99), (100, 999)])  # every magnitude, for the spelling
    return str(r.randint(low, high))


INPUTS = {"words": words_input, "numbers": numbers_input, "number": number_input}


def on_words(f):
    return lambda s: f(s.split(" "))


def on_numbers(f):
    return lambda s: f([int(x) for x in s.split(", ")])


def on_number(f):
    return lambda s: f(int(s))


def said(xs) -> str:
    return ", ".join(map(str, xs)) if xs and isinstance(xs[0], int) else " ".join(xs)


def dedupe(xs: list) -> list:
    return list(dict.fromkeys(xs))


def upper_vowels(s: str) -> str:
    return "".join(c.upper() if c in VOWELS else c for c in s)


def capitalise(w: str) -> str:
    return w[:1].upper() + w[1:]  # not str.capitalize, which lowercases the rest


ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell(n: int) -> str:
    """0 to 9999 in English words: 'three hundred forty-two' (hyphenated tens, no 'and')."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")
    big, unit = (1000, "thousand") if n >= 1000 else (100, "hundred")
    return f"{ONES[n // big]} {unit}" + (f" {spell(n % big)}" if n % big else "")


def longest(ws: list[str]) -> str:
    return max(ws, key=len)  # max keeps the first of equals


# The single tasks. Each has 5 wordings: the first 4 are trained, the 5th is held out.

TASKS = [
    # words -> words
    Task("reverse_words", ("Reverse the order of the words.", "Write the words in reverse order.",
                           "Put the words backwards, last word first.",
                           "List the same words from the last one to the first.",
                           "Flip the sequence of the words so the final word comes first."),
         "words", "words", on_words(lambda ws: said(ws[::-1]))),
    Task("reverse_letters", ("Reverse the letters of each word.", "Spell every word backwards, keeping the word order.",
                             "Write each word with its letters reversed.",
                             "Keep the words in place but reverse the letters inside each one.",
                             "Mirror every word letter by letter, leaving their order unchanged."),
         "words", "words", on_words(lambda ws: said([w[::-1] for w in ws]))),
    Task("upper_vowels", ("Uppercase the vowels.",
                          "Capitalise every vowel (a, e, i, o, u) and leave the other letters alone.",
                          "Write the text with its vowels in capital letters.", "Make each a, e, i, o and u uppercase.",
                          "Turn the vowels into capitals; consonants stay as they are."),
         "words", "words", upper_vowels),
    Task("uppercase", ("Write the words in uppercase.", "Convert the text to capital letters.",
                       "Make every letter uppercase.", "Rewrite it in all caps.",
                       "Shout it: every letter as a capital."),
         "words", "words", str.upper),
    Task("capitalise", ("Capitalise each word.", "Start every word with a capital letter.",
                        "Write the words in title case.", "Make the first letter of each word uppercase.",
                        "Give each word an initial capital."),
         "words", "words", on_words(lambda ws: said([capitalise(w) for w in ws]))),
    Task("every_other", ("Keep every other word, starting with the first.", "Write the 1st, 3rd, 5th ... words.",
                         "Drop every second word.", "Give the words in odd positions (first, third, ...).",
                         "Skip the second, fourth and sixth words and keep the rest."),
         "words", "words", on_words(lambda ws: said(ws[::2]))),
    Task("sort_words", ("Sort the words alphabetically.", "Put the words in alphabetical order.",
                        "Arrange the words from A to Z.", "Write the words in dictionary order.",
                        "Rearrange the words so they run alphabetically."),
         "words", "words", on_words(lambda ws: said(sorted(ws)))),
    Task("dedupe_words", ("Remove the repeated words, keeping the first occurrence.", "Drop duplicate words.",
                          "Write each word only once, in the order they first appear.",
                          "Delete any word that already appeared earlier.",
                          "Leave out repeats so that no word occurs twice."),
         "words", "words", on_words(lambda ws: said(dedupe(ws)))),
    Task("swap_ends", ("Swap the first and the last word.", "Exchange the first word with the last one.",
                       "Put the last word first and the first word last, keeping the middle.",
                       "Switch the positions of the opening and closing words.",
                       "Trade places between the first and final words."),
         "words", "words", on_words(lambda ws: said(ws[-1:] + ws[1:-1] + ws[:1]))),
    Task("remove_vowels", ("Remove the vowels.", "Delete every a, e, i, o and u.",
                           "Write the words without their vowels.",
                           "Strip out all vowels, keeping the consonants and spaces.",
                           "Drop the vowel letters from each word."),
         "words", "words", lambda s: "".join(c for c in s if c not in VOWELS)),
    # words -> text, numbers, number
    Task("first_letters", ("Give the first letter of each word, as one string.",
                           "Join the initial letters of the words.",
                           "Write the first letter of every word, with nothing in between.",
                           "Form a string from the words' first letters.",
                           "Take each word's opening letter and put them together."),
         "words", "text", on_words(lambda ws: "".join(w[0] for w in ws))),
    Task("last_letters", ("Give the last letter of each word, as one string.", "Join the final letters of the words.",
                          "Write the last letter of every word, with nothing in between.",
                          "Form a string from the words' last letters.",
                          "Take each word's closing letter and put them together."),
         "words", "text", on_words(lambda ws: "".join(w[-1] for w in ws))),
    Task("join_hyphen", ("Join the words with hyphens.", "Connect the words with '-' instead of spaces.",
                         "Write the words separated by dashes.",
                         "Link the words into one with a hyphen between each pair.",
                         "Use - between the words in place of the spaces."),
         "words", "text", on_words("-".join)),
    Task("underscore", ("Replace the spaces with underscores.", "Join the words with '_'.",
                        "Write the words separated by underscores.",
                        "Turn the text into snake_case by putting _ between the words.",
                        "Swap each space for an underscore character."),
         "words", "text", lambda s: s.replace(" ", "_")),
    Task("longest_word", ("Give the longest word (the first one if there is a tie).",
                          "Which word has the most letters? If several do, give the first.",
                          "Find the longest word; on a tie, the earliest.",
                          "Write the word with the most letters, the first such word if tied.",
                          "Pick out the lengthiest word, taking the earlier one when lengths are equal."),
         "words", "text", on_words(longest)),
    Task("word_lengths", ("Give the number of letters in each word.",
                          "Write the length of every word, separated by commas.",
                          "List how many letters each word has.", "Replace each word with its letter count.",
                          "For every word, say how long it is in letters."),
         "words", "numbers", on_words(lambda ws: said([len(w) for w in ws]))),
    Task("count_words", ("Count the words.", "How many words are there?", "Give the number of words.",
                         "Say how many words the text has.", "Tell me the word count."),
         "words", "number", on_words(lambda ws: str(len(ws)))),
    Task("count_letters", ("Count the letters, ignoring spaces.", "How many letters are there in total?",
                           "Give the total number of letters in all the words.", "Add up the lengths of all the words.",
                           "What is the combined letter count of the words?"),
         "words", "number", on_words(lambda ws: str(sum(map(len, ws))))),
    # numbers -> numbers
    Task("sort_ascending", ("Sort the numbers in ascending order.", "Order the numbers from smallest to largest.",
                            "Arrange the numbers in increasing order.", "Write the numbers sorted, lowest first.",
                            "Put the numbers in order going up."),
         "numbers", "numbers", on_numbers(lambda xs: said(sorted(xs)))),
    Task("sort_descending", ("Sort the numbers in descending order.", "Order the numbers from largest to smallest.",
                             "Arrange the numbers in decreasing order.", "Write the numbers sorted, highest first.",
                             "Put the numbers in order going down."),
         "numbers", "numbers", on_numbers(lambda xs: said(sorted(xs, reverse=True)))),
    Task("reverse_numbers", ("Reverse the order of the numbers.", "Write the numbers backwards, last one first.",
                             "List the numbers in reverse order.", "Flip the list around.",
                             "Give the same numbers starting from the end."),
         "numbers", "numbers", on_numbers(lambda xs: said(xs[::-1]))),
    Task("dedupe_numbers", ("Remove the repeated numbers, keeping the first occurrence.", "Drop duplicate numbers.",
                            "Write each number only once, in the order they first appear.",
                            "Delete any number that already appeared earlier.",
                            "Leave out repeats so that no number occurs twice."),
         "numbers", "numbers", on_numbers(lambda xs: said(dedupe(xs)))),
    Task("double_each", ("Double each number.", "Multiply every number by two.", "Write twice each number.",
                         "Replace each number with 2 times itself.", "Make every number two times as big."),
         "numbers", "numbers", on_numbers(lambda xs: said([2 * x for x in xs]))),
    Task("add_ten", ("Add ten to each number.", "Increase every number by 10.", "Write each number plus ten.",
                     "Raise each value by ten.", "Make every number 10 bigger."),
         "numbers", "numbers", on_numbers(lambda xs: said([x + 10 for x in xs]))),
    # numbers -> number
    Task("sum", ("Give the sum of the numbers.", "Add the numbers up.", "What is the total of the numbers?",
                 "Compute the sum of the list.", "Find what the numbers come to when added together."),
         "numbers", "number", on_numbers(lambda xs: str(sum(xs)))),
    Task("max", ("Give the largest number.", "Which number is the biggest?", "Find the maximum of the list.",
                 "Write the highest number in the list.", "Name the greatest value."),
         "numbers", "number", on_numbers(lambda xs: str(max(xs)))),
    Task("min", ("Give the smallest number.", "Which number is the lowest?", "Find the minimum of the list.",
                 "Write the least number in the list.", "Name the tiniest value."),
         "numbers", "number", on_numbers(lambda xs: str(min(xs)))),
    Task("range", ("Give the difference between the largest and the smallest number.",
                   "Subtract the minimum from the maximum.", "What is the range of the numbers (max minus min)?",
                   "How far apart are the biggest and the smallest number?",
                   "Compute the spread: the highest value minus the lowest."),
         "numbers", "number", on_numbers(lambda xs: str(max(xs) - min(xs)))),
    Task("count_numbers", ("Count the numbers.", "How many numbers are in the list?", "Give the length of the list.",
                           "Say how many numbers there are.", "Tell me how many items the list holds."),
         "numbers", "number", on_numbers(lambda xs: str(len(xs)))),
    Task("count_even", ("Count the even numbers.", "How many of the numbers are even?",
                        "Give the number of even values.",
                        "Say how many numbers are divisible by two.", "Tell me how many entries are multiples of 2."),
         "numbers", "number", on_numbers(lambda xs: str(sum(x % 2 == 0 for x in xs)))),
    # number -> number, text
    Task("double", ("Double the number.", "Multiply the number by two.", "What is twice the number?",
                    "Give two times the number.", "Compute the number times 2."),
         "number", "number", on_number(lambda n: str(2 * n))),
    Task("increment", ("Add one to the number.", "Give the next number.", "What number comes right after it?",
                       "Increase the number by 1.", "Count up by one from the number."),
         "number", "number", on_number(lambda n: str(n + 1))),
    Task("digit_sum", ("Add up the digits of the number.", "Give the sum of the digits.",
                       "What do the digits add up to?",
                       "Compute the digit sum.", "Total the individual digits."),
         "number", "number", on_number(lambda n: str(sum(map(int, str(n)))))),
    Task("spell", ("Write the number in English words.", "Spell the number out in words.",
                   "Give the number's English name, like forty-two.", "Express the number in words, not digits.",
                   "How is this number written out in letters?"),
         "number", "text", on_number(spell)),
    Task("reverse_digits", ("Reverse the digits of the number.", "Write the digits in reverse order.",
                            "Spell the number's digits backwards, keeping any zeros.",
                            "Read the digits from right to left.", "Flip the digit order of the number."),
         "number", "text", lambda s: s[::-1]),
    Task("parity", ("Is the number even or odd?", "Say whether the number is even or odd.",
                    "Answer even or odd for the number.", "Tell whether the number is odd or even.",
                    "Give the parity of the number: even or odd."),
         "number", "text", on_number(lambda n: "odd" if n % 2 else "even")),
]
BY_NAME = {t.name: t for t in TASKS}

# Two-step tasks, "first+second". FRAMES[:TRAINED] are trained; a composition's held-out wording
# is HELD_FRAME with its steps' held-out wordings.
FRAMES = ("{a} Then, on the result: {b}", "Step 1: {a} Step 2: {b}", "Do two things in order. First: {a} Second: {b}",
          "{a} After that, apply this to the result: {b}")
HELD_FRAME = "Two steps. (1) {a} (2) {b}"
COMPOSED_NAMES = """
    reverse_words+uppercase reverse_words+first_letters reverse_words+join_hyphen reverse_words+word_lengths
    sort_words+capitalise sort_words+join_hyphen sort_words+last_letters sort_words+underscore
    every_other+uppercase every_other+count_letters every_other+reverse_letters
    reverse_letters+capitalise reverse_letters+join_hyphen dedupe_words+count_words dedupe_words+join_hyphen
    swap_ends+underscore swap_ends+first_letters remove_vowels+join_hyphen remove_vowels+uppercase
    count_letters+spell
    dedupe_numbers+sum dedupe_numbers+count_numbers dedupe_numbers+reverse_numbers double_each+sum
    double_each+sort_descending double_each+range add_ten+max add_ten+sort_ascending reverse_numbers+double_each
    sort_descending+add_ten sum+spell max+parity
    double+spell double+reverse_digits increment+digit_sum increment+parity
""".split()
# Never trained; each step is trained in the same role (first or second) above.
NOVEL_NAMES = """
    reverse_words+capitalise sort_words+first_letters every_other+join_hyphen reverse_letters+uppercase
    double_each+max dedupe_numbers+sort_descending add_ten+sum sum+parity increment+spell double+digit_sum
""".split()


def compose(name: str) -> Task:
    """The task 'first+second': the second step applied to the first step's answer."""
    a, b = (BY_NAME[n] for n in name.split("+"))
    if a.gives != b.kind:
        raise ValueError(f"{name}: {a.name} gives {a.gives}, {b.name} reads {b.kind}")
    wordings = tuple(f.format(a=a.wordings[j], b=b.wordings[(j + 1) % TRAINED]) for j, f in enumerate(FRAMES))
    held = HELD_FRAME.format(a=a.held[0], b=b.held[0])
    return Task(name, wordings + (held,), a.kind, b.gives, lambda s: b.fn(a.fn(s)))


COMPOSED = [compose(n) for n in COMPOSED_NAMES]
NOVEL = [compose(n) for n in NOVEL_NAMES]


def is_eval_input(seed: int, text: str) -> bool:
    """The seeded partition of inputs: evaluation inputs never occur in training."""
    return zlib.crc32(f"{seed}|{text}".encode()) % EVAL_SIDE == 0


def draw_input(r: random.Random, kind: str, seed: int, evaluation: bool) -> str:
    while True:
        s = INPUTS[kind](r)
        if is_eval_input(seed, s) == evaluation:
            return s


def row(task: Task, wording: str, s: str) -> dict:
    return {"instruction": wording, "input": s, "output": task.fn(s), "task": task.name}


def train_rows(n: int, seed: int) -> list[dict]:
    """n rows of the single tasks and trained compositions, in their trained wordings."""
    r = random.Random(f"slimtune-gist-tasks-{seed}-train")
    rows = []
    for _ in range(n):
        t = r.choice(COMPOSED if r.random() < COMPOSED_SHARE else TASKS)
        rows.append(row(t, r.choice(t.trained), draw_input(r, t.kind, seed, evaluation=False)))
    return rows


def eval_rows(split: str, tasks: list[Task], held: bool, n: int, seed: int) -> list[dict]:
    """n rows cycling through the tasks (the held-out or the trained wordings), on evaluation
    inputs, no (instruction, input) pair twice."""
    r = random.Random(f"slimtune-gist-tasks-{seed}-{split}")
    rows, pairs, i = [], set(), 0
    while len(rows) < n:
        t = tasks[i % len(tasks)]
        i += 1
        for _ in range(100):  # a task whose pairs ran out is passed over; word tasks never run out
            w, s = r.choice(t.held if held else t.trained), draw_input(r, t.kind, seed, evaluation=True)
            if (w, s) not in pairs:
                pairs.add((w, s))
                rows.append(row(t, w, s))
                break
    return rows


def gist_task_splits(seed: int = 0, train: int = 4000, eval: int = 200) -> dict[str, list[dict]]:
    """The four splits (SPLITS): `train` rows for training, `eval` rows in each of the others."""
    trained = TASKS + COMPOSED
    return {"train": train_rows(train, seed), "seen": eval_rows("seen", trained, False, eval, seed),
            "unseen": eval_rows("unseen", trained, True, eval, seed),
            "novel": eval_rows("novel", NOVEL, False, eval, seed)}
