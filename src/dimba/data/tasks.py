"""Built-in verifiable tasks, generated offline and deterministically from a seed: every fine-tuning method can be
shown and measured on a fresh machine.

A task makes problems ``{"prompt", "answer"}`` whose answers can be checked exactly: ``arithmetic`` (the sum of two
numbers of 1..3 digits: ``"417+86="`` -> ``"503"``) and ``reverse`` (a string of letters reversed: ``"rev
dbcaf="`` -> ``"facbd"``; a bidirectional denoiser sees the whole canvas, a left-to-right model must write the
answer in the order the prompt makes hardest). A fixed tenth of all possible prompts (by a hash of the prompt) is
held out: `problems` of the ``"test"`` split come only from it, those of ``"train"`` never do, whatever the seed.

`pretraining_docs` is the small pre-training mix of a task's format from which a base model is trained (`dimba
train --data task:NAME`): problems written out as text, a share of them with a wrong answer (as text found in the
wild is), so that the base model knows the format but leaves fine-tuning something to teach.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

from dimba.errors import DataError

TASK_PREFIX = "task:"
HELD_OUT_MODULUS = 10  # a prompt is held out when crc32(prompt) % 10 == 0


@dataclass(frozen=True)
class Task:
    """A verifiable task: ``make(rng)`` draws one ``(prompt, answer)``; ``corrupt(answer, rng)`` a wrong answer of
    the same kind (the pre-training mix's noise and the rejected side of preference pairs)."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    corrupt: Callable[[str, random.Random], str]


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _make_sum(rng: random.Random) -> tuple[str, str]:
    a, b = _number(rng, 3), _number(rng, 3)
    return f"{a}+{b}=", str(a + b)


def _corrupt_number(answer: str, rng: random.Random) -> str:
    """Another number near ``answer``: one digit changed, or off by 1..10."""
    if rng.random() < 0.5:
        pos = rng.randrange(len(answer))
        digit = rng.choice([d for d in "0123456789" if d != answer[pos] and (pos > 0 or d != "0" or len(answer) == 1)])
        return answer[:pos] + digit + answer[pos + 1:]
    return str(max(0, int(answer) + rng.choice([-1, 1]) * rng.randint(1, 10)) or int(answer) + 1)


_LETTERS = "abcdefghij"


def _make_reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8)))
    return f"rev {word}=", word[::-1]


def _corrupt_word(answer: str, rng: random.Random) -> str:
    """``answer`` with two neighbouring letters swapped (or one letter changed when they are equal)."""
    pos = rng.randrange(len(answer) - 1)
    swapped = answer[:pos] + answer[pos + 1] + answer[pos] + answer[pos + 2:]
    if swapped != answer:
        return swapped
    return answer[:pos] + rng.choice([c for c in _LETTERS if c != answer[pos]]) + answer[pos + 1:]


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", "the sum of two numbers of 1 to 3 digits, exact-match answers",
                       _make_sum, _corrupt_number),
    "reverse": Task("reverse", "a string of 3 to 8 letters reversed (a task for a bidirectional model)",
                    _make_reverse, _corrupt_word),
}


def task_names() -> list[str]:
    """The names of the built-in tasks."""
    return list(TASKS)


def task_of(spec: str) -> Task | None:
    """The built-in task a data spec ``task:NAME`` names; None for any other spec (a file); a one-line `DataError`
    for an unknown name."""
    if not spec.startswith(TASK_PREFIX):
        return None
    name = spec[len(TASK_PREFIX):]
    if name not in TASKS:
        raise DataError(f"unknown built-in task {name!r}: choose one of {', '.join(TASK_PREFIX + n for n in TASKS)}")
    return TASKS[name]


def is_held_out(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out tenth (fixed by its crc32, independent of any seed)."""
    return zlib.crc32(prompt.encode("utf-8")) % HELD_OUT_MODULUS == 0


def problems(task: Task, n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct problems ``{"prompt", "answer"}`` of ``task`` from ``split`` ("train": never a held-out
    prompt; "test": only held-out prompts), the same for the same seed on every machine."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{task.name}/{split}/{seed}")
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for _ in range(200 * n + 1000):
        prompt, answer = task.make(rng)
        if prompt in seen or is_held_out(prompt) != (split == "test"):
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "answer": answer})
        if len(out) == n:
            return out
    raise DataError(f"task {task.name!r} has fewer than {n} distinct {split} problems: ask for fewer")


def sft_rows(task: Task, n: int, seed: int) -> list[dict[str, str]]:
    """Supervised rows ``{"prompt", "response"}``: training problems with their correct answers."""
    return [{"prompt": p["prompt"], "response": p["answer"]} for p in problems(task, n, seed)]


def preference_rows(task: Task, n: int, seed: int) -> list[dict[str, str]]:
    """Preference rows ``{"prompt", "chosen", "rejected"}``: the correct answer against a wrong one near it."""
    rng = random.Random(f"{task.name}/rejected/{seed}")
    return [{"prompt": p["prompt"], "chosen": p["answer"], "rejected": task.corrupt(p["answer"], rng)}
            for p in problems(task, n, seed)]


def pretraining_docs(task: Task, n: int = 20000, seed: int = 0, wrong: float = 0.3) -> list[str]:
    """The pre-training mix of ``task``: ``n`` training problems written as ``prompt + answer`` documents (EOS
    follows each in packing), a share ``wrong`` of them with a wrong answer."""
    rng = random.Random(f"{task.name}/pretrain/{seed}")
    docs = []
    for p in problems(task, n, seed):
        answer = task.corrupt(p["answer"], rng) if rng.random() < wrong else p["answer"]
        docs.append(p["prompt"] + answer)
    return docs
