"""The embedded demo model's task: chats whose answers a program can check, in DeepSeek's chat
format (the checkpoint's own template, model/chat_template.jinja), R1 style: the model writes a
line of reasoning, closes it with `</think>`, then answers.

Sorting a list of 3-7 digits, in three kinds of conversation:
    plain   user "sort 5,1,4,1"                       -> "I sort the digits.\\n</think>1,1,4,5"
    call    the same with the sort_digits tool given  -> "I call sort_digits.\\n</think>" + a call of
                                                         sort_digits with {"digits": "5,1,4,1"}
    answer  the call turn, then the tool's output      -> "The tool sorted them.\\n</think>1,1,4,5"
each followed by the end-of-sentence token.

Tried first and dropped, because a model this size did not learn them in the few minutes of
CPU training it gets (600 steps of 64 problems, mixed half and half with sorting, held-out exact
answers): multi-digit addition (MSB-first 0.7%, reversed sum 0-1%, zero-padded reversed 0.2%)
and list reversal (1.8%, and it dragged sorting down to 27%).

Train and held-out problems come from disjoint seeded streams; a problem is held out when its
digit list is not in the training stream (regenerated from its seed and size, and checked).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

from model.chat_tokens import THINK_END, tool_calls_text

KINDS = ("plain", "call", "answer")
# One line of reasoning per kind. Restating the digits was tried first: a model this size copied a
# digit list tens of tokens away wrongly too often (92% plain, 38% of calls right after 600 steps).
REASONING = {"plain": "I sort the digits.\n", "call": "I call sort_digits.\n", "answer": "The tool sorted them.\n"}
TOOL_NAME = "sort_digits"
SORT_TOOL = {"type": "function", "function": {
    "name": TOOL_NAME, "description": "Sorts a list of digits.",
    "parameters": {"type": "object", "properties": {"digits": {"type": "string"}}, "required": ["digits"]}}}


def run_sort_tool(arguments: str) -> str:
    """What the demo's tool returns for its JSON arguments: the digits, sorted."""
    digits = json.loads(arguments)["digits"]
    return ",".join(sorted(digits.split(",")))


@dataclass(frozen=True)
class Problem:
    digits: str  # "5,1,4,1"
    kind: str = "plain"

    @property
    def question(self) -> str:
        return "sort " + self.digits

    @property
    def answer(self) -> str:
        return ",".join(sorted(self.digits.split(",")))

    @property
    def arguments(self) -> str:
        return json.dumps({"digits": self.digits})

    @property
    def messages(self) -> list[dict]:
        user = [{"role": "user", "content": self.question}]
        if self.kind != "answer":
            return user
        call = {"id": "call_0", "type": "function", "function": {"name": TOOL_NAME, "arguments": self.arguments}}
        return user + [{"role": "assistant", "content": None, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "call_0", "content": run_sort_tool(self.arguments)}]

    @property
    def tools(self) -> list[dict] | None:
        return [SORT_TOOL] if self.kind != "plain" else None

    @property
    def prompt(self) -> str:
        """The conversation rendered by the checkpoint's template, up to the open reasoning span."""
        return render(self.messages, self.tools)

    @property
    def reasoning(self) -> str:
        return REASONING[self.kind]

    @property
    def content(self) -> str:
        if self.kind == "call":
            return tool_calls_text([(TOOL_NAME, self.arguments)])
        return self.answer

    @property
    def completion(self) -> str:
        """What the model is trained to write (then the end-of-sentence token)."""
        return self.reasoning + THINK_END + self.content


@functools.lru_cache(maxsize=1)
def _renderer():
    from transformers import PreTrainedTokenizerFast

    from model.tokenizer_maker import BOS_TOKEN, EOS_TOKEN, build_tokenizer, chat_template

    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   chat_template=chat_template())


def render(messages: list[dict], tools: list[dict] | None = None) -> str:
    msgs = [{**m, "content": m["content"] or ""} for m in messages]
    return _renderer().apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)


def _digits(rng: random.Random) -> str:
    return ",".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 7)))


def problems(seed: int, n: int, kinds: tuple[str, ...] = ("plain",)) -> list[Problem]:
    """Deterministic by seed; kinds in turn."""
    rng = random.Random(seed)
    return [Problem(_digits(rng), kinds[i % len(kinds)]) for i in range(n)]


def held_out(seed: int, n: int, exclude: set[str], kinds: tuple[str, ...] = ("plain",)) -> list[Problem]:
    """exclude: digit lists to leave out (the training stream's)."""
    out: list[Problem] = []
    rng = random.Random(seed)
    while len(out) < n:
        d = _digits(rng)
        if d not in exclude:
            out.append(Problem(d, kinds[len(out) % len(kinds)]))
    return out


def is_correct(problem: Problem, completion: str) -> bool:
    """The whole completion as trained: reasoning, `</think>`, answer (or call)."""
    return completion == problem.completion
