"""The embedded demo model's task: text problems whose answers a program can check.

Sorting a list of 3-7 digits, one line, the answer ending at the end-of-sentence token:
    "sort 5,1,4,1=" -> "1,1,4,5"

Tried first and dropped, because a model this size did not learn them in the few minutes of
CPU training it gets (600 steps of 64 problems, mixed half and half with sorting, held-out exact
answers): multi-digit addition (MSB-first 0.7%, reversed sum 0-1%, zero-padded reversed 0.2%)
and list reversal (1.8%, and it dragged sorting down to 27%).

Train and held-out problems come from disjoint seeded streams; a problem is held out when its
text is not in the training stream (regenerated from its seed and size, and checked).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def sorting(rng: random.Random) -> Problem:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 7))]
    return Problem("sort " + ",".join(map(str, digits)) + "=", ",".join(map(str, sorted(digits))))


def problems(seed: int, n: int) -> list[Problem]:
    """Deterministic by seed."""
    rng = random.Random(seed)
    return [sorting(rng) for _ in range(n)]


def held_out(seed: int, n: int, exclude: set[str]) -> list[Problem]:
    out: list[Problem] = []
    rng = random.Random(seed)
    while len(out) < n:
        p = sorting(rng)
        if p.prompt not in exclude:
            out.append(p)
    return out


def is_correct(problem: Problem, completion: str) -> bool:
    return completion.strip() == problem.answer
