"""Seeded instruction tasks with exact-match answers, built in code (no downloads).

Each task family is a function ``rng -> (prompt, answer)``. The families are chosen so that the *content* of the
answer has to be copied, rearranged or computed from the prompt -- the kind of generative skill a side network reading
a frozen backbone is suspected to struggle with (see ``/work/shared/notes/qst-method.md``, "Known risk") -- and so that
the answer is checked by exact string match:

========== ================================================================ =====================
family     prompt (abridged)                                                answer
========== ================================================================ =====================
date       Convert the date 2024-03-15 to the format DD/MM/YYYY.           15/03/2024
sort       Sort these numbers in ascending order: 42, 7, 19, 88, 3          3, 7, 19, 42, 88
arith      Compute 37 + 48.                                                 85
words      Write these words in reverse order: lamp river stone cup         cup stone river lamp
classify   Label the number 37 as <parity>-<size> (size: small below 50)    odd-small
extract    Maria flew from Oslo to Lima on Friday. Where did Maria fly to?  Lima
========== ================================================================ =====================

The instruction-tuned base model answers in full sentences, so it scores close to 0% exact match; a fine-tune has to
learn both the terse output format and the content. :func:`make_splits` builds a train pool and a held-out eval set
from separate random streams and removes from the train pool every prompt that is in the eval set, so the splits never
overlap. :func:`encode_example` renders an example with the tokenizer's chat template and masks the loss to the answer
tokens (and the end-of-turn token that stops generation).

    .venv/bin/python integration/quality/tasks.py --n 3        # print a few examples of each family
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

# ------------------------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------------------------

MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]
DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

WORDS = """
apple river stone lamp cloud table garden window bread candle mirror forest pencil rocket violin basket
bottle button camera carpet castle cherry circle coffee copper desert dragon engine feather finger flower
hammer helmet island jacket kettle ladder lemon magnet marble meadow needle orange pepper pillow planet
pocket rabbit ribbon saddle shadow silver spider spoon summer ticket tiger tomato tunnel valley wagon
wallet winter wizard yellow anchor arrow badge barrel beacon blanket bucket cabin canvas cactus compass
cotton crystal dolphin falcon fossil glacier harbor honey lantern lizard maple orbit paddle parrot pebble
puzzle quartz saucer signal sponge thunder timber trumpet velvet walnut whistle
""".split()

NAMES = """
Maria John Aisha Carlos Yuki Omar Elena Liam Priya Noah Sofia Lucas Amara Hugo Mei Felix Nadia Oscar
Leila Tomas Ingrid Ravi Chloe Mateo Zara Ivan Hana Diego Freya Samir
""".split()

CITIES = """
Oslo Lima Paris Cairo Tokyo Madrid Dublin Nairobi Lisbon Quito Vienna Prague Seoul Athens Denver Sydney
Toronto Havana Dakar Manila Bogota Warsaw Helsinki Riga Porto Geneva Osaka Kyoto Boston Austin
""".split()

# ------------------------------------------------------------------------------------------------------------------
# task families
# ------------------------------------------------------------------------------------------------------------------

DATE_FORMATS = ("YYYY-MM-DD", "DD/MM/YYYY", "MM.DD.YYYY", "Month D, YYYY")


def _format_date(year: int, month: int, day: int, fmt: str) -> str:
    if fmt == "YYYY-MM-DD":
        return f"{year:04d}-{month:02d}-{day:02d}"
    if fmt == "DD/MM/YYYY":
        return f"{day:02d}/{month:02d}/{year:04d}"
    if fmt == "MM.DD.YYYY":
        return f"{month:02d}.{day:02d}.{year:04d}"
    if fmt == "Month D, YYYY":
        return f"{MONTHS[month - 1]} {day}, {year:04d}"
    raise ValueError(fmt)


def task_date(rng: random.Random) -> tuple[str, str]:
    """Rewrite a date from one format into another named format (day/month must be copied, not guessed)."""
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    source, target = rng.sample(DATE_FORMATS, 2)
    prompt = f"Convert the date {_format_date(year, month, day, source)} to the format {target}."
    return prompt, _format_date(year, month, day, target)


def task_sort(rng: random.Random) -> tuple[str, str]:
    """Sort 5-7 distinct numbers, ascending or descending (numbers must be copied from the prompt)."""
    numbers = rng.sample(range(1, 100), rng.randint(5, 7))
    descending = rng.random() < 0.5
    order = "descending" if descending else "ascending"
    prompt = f"Sort these numbers in {order} order: {', '.join(map(str, numbers))}"
    return prompt, ", ".join(map(str, sorted(numbers, reverse=descending)))


def task_arith(rng: random.Random) -> tuple[str, str]:
    """Add or subtract two two-digit numbers (non-negative result)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return f"Compute {a} + {b}.", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"Compute {a} - {b}.", str(a - b)


def task_words(rng: random.Random) -> tuple[str, str]:
    """Rearrange 4-6 words: reverse their order, or put them in alphabetical order."""
    words = rng.sample(WORDS, rng.randint(4, 6))
    if rng.random() < 0.5:
        return f"Write these words in reverse order: {' '.join(words)}", " ".join(reversed(words))
    return f"Write these words in alphabetical order: {' '.join(words)}", " ".join(sorted(words))


def task_classify(rng: random.Random) -> tuple[str, str]:
    """Label a number by a stated two-part rule: parity and size, joined by a hyphen."""
    n = rng.randint(1, 999)
    threshold = rng.choice([50, 100, 250, 500])
    prompt = (
        f"Label the number {n} as <parity>-<size>, where parity is even or odd and size is small if the number is "
        f"below {threshold}, otherwise large."
    )
    return prompt, f"{'even' if n % 2 == 0 else 'odd'}-{'small' if n < threshold else 'large'}"


def task_extract(rng: random.Random) -> tuple[str, str]:
    """Answer a question about one field of a short generated sentence (a city, a name or a weekday)."""
    name, other = rng.sample(NAMES, 2)
    origin, destination = rng.sample(CITIES, 2)
    weekday = rng.choice(WEEKDAYS)
    fact = f"{name} flew from {origin} to {destination} on {weekday} with {other}."
    question, answer = rng.choice(
        [
            (f"Where did {name} fly to?", destination),
            (f"Where did {name} fly from?", origin),
            (f"On which day did {name} fly?", weekday),
            (f"Who flew with {name}?", other),
        ]
    )
    return f"{fact} {question} Answer with one word.", answer


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "date": task_date,
    "sort": task_sort,
    "arith": task_arith,
    "words": task_words,
    "classify": task_classify,
    "extract": task_extract,
}


# ------------------------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str
    answer: str

    def to_dict(self) -> dict:
        return asdict(self)


def _generate(n: int, seed: int, families: list[str], exclude: set[str]) -> list[Example]:
    """``n`` unique examples, families in round robin (balanced), none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        family = families[len(out) % len(families)]
        prompt, answer = FAMILIES[family](rng)
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct examples from families {families}")
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append(Example(family, prompt, answer))
    return out


def make_splits(
    n_train: int, n_eval: int, seed: int = 0, families: list[str] | None = None
) -> tuple[list[Example], list[Example]]:
    """A train pool and a held-out eval set that share no prompt.

    The eval set is drawn first from the stream ``seed * 1000 + 1``; the train pool from the stream ``seed * 1000 + 2``
    rejects every prompt of the eval set and every duplicate. Families alternate in round robin in both, so each split
    is balanced across families. Deterministic for a given ``(n_train, n_eval, seed, families)``; the eval set does
    not depend on ``n_train``.
    """
    families = list(families or FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {sorted(FAMILIES)}")
    eval_set = _generate(n_eval, seed * 1000 + 1, families, exclude=set())
    train = _generate(n_train, seed * 1000 + 2, families, exclude={e.prompt for e in eval_set})
    assert not {e.prompt for e in train} & {e.prompt for e in eval_set}
    return train, eval_set


# ------------------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------------------


def prompt_text(tokenizer, example: Example) -> str:
    """The chat-template prompt up to and including the assistant header (what generation starts from)."""
    messages = [{"role": "user", "content": example.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in the chat template (``<|im_end|>`` for SmolLM2)."""
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False
    )
    tail = probe.split("ANSWER", 1)[1]
    for token in tokenizer.all_special_tokens:
        if tail.startswith(token):
            return token
    return tokenizer.eos_token


def encode_example(tokenizer, example: Example) -> dict:
    """``input_ids`` = prompt + answer + end-of-turn; ``labels`` = -100 on the prompt, the ids on the rest.

    Prompt and answer are tokenized separately and concatenated, so the training sequence begins with exactly the
    token ids that generation starts from.
    """
    prompt_ids = tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer + end_of_turn_token(tokenizer), add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + answer_ids,
        "labels": [-100] * len(prompt_ids) + answer_ids,
        "prompt_len": len(prompt_ids),
        "answer_len": len(answer_ids),
    }


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2, help="examples per family to print")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, eval_set = make_splits(0, args.n * len(FAMILIES), seed=args.seed)
    for example in eval_set:
        print(f"[{example.family}] {example.prompt}\n    -> {example.answer}")


if __name__ == "__main__":
    main()
