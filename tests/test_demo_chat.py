"""The demo model chats as DeepSeek-R1 does, through the official openai client against a real
`mlaserve serve --http-port 0 --reasoning-parser deepseek_r1 --tool-call-parser deepseek_v3
--enable-auto-tool-choice`: reasoning apart from the answer, a call of its tool, and the answer
from the tool's output; streamed and not, the stream's deltas adding up to the whole answer."""

import json
import re

import pytest

from model.demo_checkpoint import default_model_dir
from model.demo_task import REASONING, SORT_TOOL, TOOL_NAME, run_sort_tool
from tests.server_util import left_running
from tests.test_http_server import HttpServer

QUESTION = [{"role": "user", "content": "sort 5,1,4,1"}]
GREEDY = {"temperature": 0, "max_tokens": 96}


@pytest.fixture(scope="module")
def http():
    s = HttpServer(default_model_dir(), "--reasoning-parser", "deepseek_r1", "--tool-call-parser", "deepseek_v3",
                   "--enable-auto-tool-choice")
    yield s
    assert s.stop() == 0, s.log
    assert not left_running(s.children), "engine processes left running"


def _streamed(client, model: str, **kw) -> dict:
    """The stream's deltas, concatenated per field (tool calls assembled by index)."""
    out = {"reasoning_content": "", "content": "", "tool_calls": {}, "finish_reason": None}
    for chunk in client.chat.completions.create(model=model, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.model_dump()
        out["reasoning_content"] += delta.get("reasoning_content") or ""
        out["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            got = out["tool_calls"].setdefault(call["index"], {"name": "", "arguments": ""})
            got["name"] += call["function"].get("name") or ""
            got["arguments"] += call["function"].get("arguments") or ""
        out["finish_reason"] = chunk.choices[0].finish_reason or out["finish_reason"]
    return out


def test_the_answer_is_the_content_and_the_reasoning_comes_apart(http):
    client = http.client()
    r = client.chat.completions.create(model=http.model, messages=QUESTION, **GREEDY)
    message = r.choices[0].message.model_dump()
    assert message["content"] == "1,1,4,5" and r.choices[0].finish_reason == "stop"
    assert message["reasoning_content"] == message["reasoning"] == REASONING["plain"]
    assert r.usage.model_dump()["completion_tokens_details"]["reasoning_tokens"] > 0
    streamed = _streamed(client, http.model, messages=QUESTION, **GREEDY)
    assert (streamed["reasoning_content"], streamed["content"]) == (message["reasoning_content"], "1,1,4,5")
    assert streamed["finish_reason"] == "stop" and not streamed["tool_calls"]


def test_a_tool_call_then_the_answer_from_the_tools_output(http):
    client = http.client()
    r = client.chat.completions.create(model=http.model, messages=QUESTION, tools=[SORT_TOOL], **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    # The demo copies the question's digits into its call right in about a third of held-out chats
    # (docs/chat.md); here it is the call's shape that is checked: the tool, and a digit list.
    assert call.function.name == TOOL_NAME and re.fullmatch(r"\d(,\d)*", json.loads(call.function.arguments)["digits"])
    streamed = _streamed(client, http.model, messages=QUESTION, tools=[SORT_TOOL], **GREEDY)
    assert streamed["finish_reason"] == "tool_calls"
    assert streamed["tool_calls"] == {0: {"name": TOOL_NAME, "arguments": call.function.arguments}}

    # The usual client loop: the assistant's message goes back as returned, then the tool's output.
    messages = QUESTION + [choice.message, {"role": "tool", "tool_call_id": call.id,
                                            "content": run_sort_tool(call.function.arguments)}]
    answer = client.chat.completions.create(model=http.model, messages=messages, tools=[SORT_TOOL], **GREEDY)
    sorted_by_tool = run_sort_tool(call.function.arguments)
    assert answer.choices[0].message.content == sorted_by_tool and answer.choices[0].finish_reason == "stop"
    assert not answer.choices[0].message.tool_calls
    assert _streamed(client, http.model, messages=messages, tools=[SORT_TOOL], **GREEDY)["content"] == sorted_by_tool


def test_a_constraint_applies_after_the_reasoning(http):
    """Structured outputs with the R1 parser: the model reasons unconstrained, then the content
    obeys the grammar (a choice the demo would never write, a regex it writes anyway)."""
    client = http.client()
    for structured, want in (({"choice": ["yes", "no"]}, {"yes", "no"}), ({"regex": "[0-9](,[0-9])*"}, {"1,1,4,5"})):
        r = client.chat.completions.create(model=http.model, messages=QUESTION, **GREEDY,
                                           extra_body={"structured_outputs": structured})
        message = r.choices[0].message.model_dump()
        assert message["reasoning_content"] == REASONING["plain"] and message["content"] in want, message
