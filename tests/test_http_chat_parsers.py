"""The HTTP server with --reasoning-parser deepseek_r1, --tool-call-parser deepseek_v3 and
--enable-auto-tool-choice, through the official openai client. The tiny checkpoint writes no
`</think>`, so its whole answer is reasoning (R1's rule for an output that never left the span):
what is checked here is the wiring; the parsers' text rules are tests/test_chat_parsers.py's."""

import openai
import pytest

from tests.server_util import left_running
from tests.test_http_server import HttpServer

TOOLS = [{"type": "function", "function": {"name": "sort_digits", "description": "Sorts digits.",
                                           "parameters": {"type": "object", "properties": {
                                               "digits": {"type": "array", "items": {"type": "integer"}}}}}}]


@pytest.fixture(scope="module")
def http(tiny_checkpoint):
    s = HttpServer(tiny_checkpoint, "--reasoning-parser", "deepseek_r1", "--tool-call-parser", "deepseek_v3",
                   "--enable-auto-tool-choice")
    yield s
    assert s.stop() == 0, s.log
    assert not left_running(s.children), "engine processes left running"


def test_reasoning_content_whole_and_streamed_and_counted(http):
    client = http.client()
    messages = [{"role": "user", "content": "sort 5,1,4,1"}]
    whole = client.chat.completions.create(model=http.model, messages=messages, max_tokens=12, temperature=0, n=2)
    plain = client.completions.create(model=http.model, prompt=http.post("/tokenize", {"messages": messages})[1]
                                      ["tokens"], max_tokens=12, temperature=0)
    for choice in whole.choices:
        fields = choice.message.model_dump()
        assert fields["reasoning_content"] == fields["reasoning"] == plain.choices[0].text
        assert fields["content"] is None and choice.finish_reason == plain.choices[0].finish_reason
    assert whole.usage.model_dump()["completion_tokens_details"]["reasoning_tokens"] > 0
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model=http.model, messages=messages, max_tokens=12, temperature=0,
                                                stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta.model_dump()
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
    assert reasoning == plain.choices[0].text and content == ""


def test_tools_are_accepted_and_bad_tool_fields_are_400s_naming_them(http):
    client = http.client()
    out = client.chat.completions.create(model=http.model, messages=[{"role": "user", "content": "sort 3,2"}],
                                         tools=TOOLS, tool_choice="auto", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and not out.choices[0].message.tool_calls
    for bad, param in [({"tools": [{"type": "function"}]}, "tools"), ({"tools": "sort"}, "tools"),
                       ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
                       ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=http.model, messages=[{"role": "user", "content": "x"}],
                                           max_tokens=2, **bad)
        assert e.value.body["param"] == param, bad
