"""The DeepSeek-R1 reasoning parser and the DeepSeek-V3 tool-call parser: whole answers, and every
way of cutting them into stream chunks giving the same fields."""

import json

import pytest

from entrypoints.reasoning_parser import ReasoningStream, prompt_opens_reasoning, split_reasoning
from entrypoints.tool_parser import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, ToolCallStream, split_tool_calls
from model.chat_tokens import tool_calls_text


def call_text(name: str, args: dict | str) -> str:
    body = args if isinstance(args, str) else json.dumps(args)
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{body}\n```{CALL_END}"


REASONING_CASES = [
    ("<think>\ncount: 4 digits\n</think>\n\n1,1,4,5", ("\ncount: 4 digits\n", "\n\n1,1,4,5")),
    ("count: 4 digits</think>1,1,4,5", ("count: 4 digits", "1,1,4,5")),  # the template opened the span
    ("</think>1,1,4,5", ("", "1,1,4,5")),  # a lone end tag: empty reasoning
    ("still thinking <thi", ("still thinking <thi", None)),  # no end: all reasoning
    ("", ("", None)),
    ("<think>a</think>b</think>c", ("a", "b</think>c")),  # only the first end tag ends the span
    ("<thinking>x</think>y", ("<thinking>x", "y")),
]
# After a prompt that did not open the span (thinking off): the answer, unless the output opens one.
ANSWER_FIRST_CASES = [
    ("1,1,4,5", ("", "1,1,4,5")),
    ("<think>x</think>y", ("x", "y")),
    ("<think>unterminated", ("unterminated", None)),
    ("a</think>b", ("", "a</think>b")),
    ("<thi", ("", "<thi")),
    ("", ("", "")),
]
CASES = [(t, True, e) for t, e in REASONING_CASES] + [(t, False, e) for t, e in ANSWER_FIRST_CASES]


@pytest.mark.parametrize("text,thinking,expected", CASES)
def test_reasoning_split_of_whole_answers(text, thinking, expected):
    assert split_reasoning(text, thinking) == expected


def test_the_prompt_tells_where_the_output_starts():
    assert prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n") and prompt_opens_reasoning(None)
    assert not prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜>")
    assert not prompt_opens_reasoning("<｜User｜>hi<｜Assistant｜><think>\n</think>")  # V3.1's non-thinking prompt


def stream_reasoning(pieces, thinking=True):
    s = ReasoningStream(thinking=thinking)
    reasoning, content = "", ""
    for p in pieces:
        r, c = s.feed(p)
        reasoning, content = reasoning + r, content + c
    r, c = s.finish()
    return reasoning + r, (None if s.thinking else content + c)


@pytest.mark.parametrize("text,thinking,expected", CASES)
def test_reasoning_stream_gives_the_whole_answers_fields_at_every_cut(text, thinking, expected):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert stream_reasoning([text[:i], text[i:j], text[j:]], thinking) == expected, (i, j)
    assert stream_reasoning(list(text), thinking) == expected  # a character per chunk


TOOL_CASES = [
    ("plain answer", "plain answer", []),
    (f"Let me sort.{CALLS_BEGIN}{call_text('sort_digits', {'digits': [5, 1, 4]})}{CALLS_END}",
     "Let me sort.", [("sort_digits", {"digits": [5, 1, 4]})]),
    (f"{CALLS_BEGIN}{call_text('a', {'x': 1})}\n{call_text('b', {})}{CALLS_END}",
     "", [("a", {"x": 1}), ("b", {})]),
    # malformed arguments stay content; the good call is kept
    (f"{CALLS_BEGIN}{call_text('bad', '{not json')}{call_text('good', {'k': 'v'})}{CALLS_END}",
     call_text("bad", "{not json"), [("good", {"k": "v"})]),
    # unterminated: everything the model wrote comes back as content
    (f"answer{CALLS_BEGIN}{CALL_BEGIN}function{SEP}sort_digits\n```json\n{{\"digits\": [1",
     f"answer{CALLS_BEGIN}{CALL_BEGIN}function{SEP}sort_digits\n```json\n{{\"digits\": [1", []),
    (f"{CALLS_BEGIN}{call_text('a', {'x': 1})}{CALLS_END} trailing", " trailing", [("a", {"x": 1})]),
    (f"{CALLS_BEGIN}garbage", f"{CALLS_BEGIN}garbage", []),
]


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text,content,calls", TOOL_CASES)
def test_tool_calls_of_whole_answers(text, content, calls):
    got_content, got_calls = split_tool_calls(text)
    assert (got_content, _calls(got_calls)) == (content, calls)
    assert all(c.id.startswith("call_") and c.openai()["type"] == "function" for c in got_calls)


def stream_tools(pieces):
    s = ToolCallStream()
    content, calls = "", []
    for p in pieces:
        c, new = s.feed(p)
        content += c
        calls += new
    return content + s.finish(), _calls(calls)


@pytest.mark.parametrize("text,content,calls", TOOL_CASES)
def test_tool_call_stream_gives_the_whole_answers_fields_at_every_cut(text, content, calls):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            assert stream_tools([text[:i], text[i:j], text[j:]]) == (content, calls), (i, j)
    assert stream_tools(list(text)) == (content, calls)


def test_a_call_is_streamed_as_soon_as_it_is_complete():
    s = ToolCallStream()
    first = f"{CALLS_BEGIN}{call_text('a', {'x': 1})}"
    assert _calls(s.feed(first)[1]) == [("a", {"x": 1})]
    assert s.feed(call_text("b", {}))[1][0].name == "b"


def test_hostile_arguments_do_not_break_the_parser():
    deep = "[" * 100000 + "]" * 100000
    content, calls = split_tool_calls(f"{CALLS_BEGIN}{call_text('x', deep)}{CALLS_END}")
    assert calls == [] and deep in content


def test_a_choice_with_reasoning_and_a_tool_call_whole_and_streamed():
    from entrypoints.chat_output import ChoiceOutput

    text = f"the digits are 5,1,4</think>I will sort.{CALLS_BEGIN}{call_text('sort_digits', {'digits': [5, 1, 4]})}" \
           f"{CALLS_END}"
    whole = ChoiceOutput(reasoning=True, tools=True)
    msg = whole.message(text)
    assert msg["reasoning_content"] == msg["reasoning"] == "the digits are 5,1,4"
    assert msg["content"] == "I will sort."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]] == \
        [("sort_digits", {"digits": [5, 1, 4]})]
    assert whole.finish_reason("stop") == "tool_calls" and whole.finish_reason("length") == "length"
    for cut in range(0, len(text) + 1, 2):
        streamed = ChoiceOutput(reasoning=True, tools=True)
        deltas = [streamed.delta(text[:cut], False), streamed.delta(text[cut:], True)]
        joined = {k: "".join(d.get(k, "") for d in deltas) for k in ("reasoning_content", "content")}
        calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert joined == {"reasoning_content": msg["reasoning_content"], "content": msg["content"]}, cut
        assert [c["index"] for c in calls] == [0] and calls[0]["function"]["name"] == "sort_digits"


def test_without_parsers_the_text_is_the_content():
    from entrypoints.chat_output import ChoiceOutput

    out = ChoiceOutput(reasoning=False, tools=False)
    assert out.message("a</think>b") == {"role": "assistant", "content": "a</think>b"}


CONVERSATION = [
    {"role": "system", "content": "You sort."},
    {"role": "user", "content": "sort 3,1,2"},
    {"role": "assistant", "content": "<think>three digits</think>Calling the tool.",
     "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "sort_digits",
                                                                      "arguments": '{"digits": [3, 1, 2]}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "[1, 2, 3]"},
    {"role": "tool", "tool_call_id": "call_2", "content": "ok"},
    {"role": "assistant", "content": "1,2,3"},
    {"role": "user", "content": "again"},
]
RENDERED = ("<｜begin▁of▁sentence｜>You sort.<｜User｜>sort 3,1,2<｜Assistant｜>Calling the tool."
            "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>sort_digits\n```json\n"
            '{"digits": [3, 1, 2]}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
            "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>[1, 2, 3]<｜tool▁output▁end｜>"
            "<｜tool▁output▁begin｜>ok<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
            "<｜Assistant｜>1,2,3<｜end▁of▁sentence｜><｜User｜>again<｜Assistant｜>")


def _checkpoint_tokenizer(path, with_template: bool = True):
    from model.tokenizer_maker import write_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path)
    if not with_template:
        config = json.loads((path / "tokenizer_config.json").read_text())
        del config["chat_template"]
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_a_multi_turn_tool_conversation_renders_in_the_format(tmp_path):
    from entrypoints.chat_format import ChatFormatter

    ours = ChatFormatter(_checkpoint_tokenizer(tmp_path / "ours"))
    assert ours.render(CONVERSATION) == RENDERED + "<think>\n"  # R1 style: the answer opens its reasoning
    assert ours.render(CONVERSATION, template_kwargs={"thinking": False}) == RENDERED
    # A checkpoint without a template: the same format, V3 style (thinking off unless asked).
    plain = ChatFormatter(_checkpoint_tokenizer(tmp_path / "plain", with_template=False))
    assert plain.render(CONVERSATION) == RENDERED
    assert plain.render(CONVERSATION, template_kwargs={"thinking": True}) == RENDERED + "<think>\n"
    # The assistant's call, parsed back, is the call it was rendered from.
    calls_part = RENDERED.split("Calling the tool.", 1)[1].split("<｜end▁of▁sentence｜>", 1)[0]
    content, calls = split_tool_calls(calls_part)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("sort_digits", '{"digits": [3, 1, 2]}')]
    assert calls_part == tool_calls_text([("sort_digits", '{"digits": [3, 1, 2]}')])


def test_tools_are_described_after_the_system_prompt(tmp_path):
    from entrypoints.chat_format import ChatFormatter
    from model.demo_task import SORT_TOOL

    text = ChatFormatter(_checkpoint_tokenizer(tmp_path)).render(CONVERSATION[:2], [SORT_TOOL])
    assert text == ("<｜begin▁of▁sentence｜>You sort.\n\n## Tools\n### sort_digits\nSorts a list of digits.\n"
                    'Parameters: {"type": "object", "properties": {"digits": {"type": "string"}}, '
                    '"required": ["digits"]}\nCall tools as: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function'
                    "<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
                    "<｜User｜>sort 3,1,2<｜Assistant｜><think>\n")


def test_the_rendered_conversation_is_the_token_ids_the_format_defines(tmp_path):
    """Against ids written out by hand: BOS 0, EOS 1, byte b is 2 + b, and the format's tokens
    258-270 (each one id, never spelled out in bytes)."""
    from entrypoints.chat_format import ChatFormatter
    from model.tokenizer_maker import build_tokenizer

    def b(text: str) -> list[int]:
        return [2 + byte for byte in text.encode()]

    user, assistant, think = 258, 259, 260
    calls_begin, call_begin, sep, call_end, calls_end = 262, 263, 264, 265, 266
    outputs_begin, output_begin, output_end, outputs_end = 267, 268, 269, 270
    expected = ([0] + b("You sort.") + [user] + b("sort 3,1,2") + [assistant] + b("Calling the tool.")
                + [calls_begin, call_begin] + b("function") + [sep] + b('sort_digits\n```json\n{"digits": [3, 1, 2]}'
                                                                          "\n```") + [call_end, calls_end, 1]
                + [outputs_begin, output_begin] + b("[1, 2, 3]") + [output_end, output_begin] + b("ok")
                + [output_end, outputs_end] + [assistant] + b("1,2,3") + [1] + [user] + b("again")
                + [assistant, think] + b("\n"))
    text = ChatFormatter(_checkpoint_tokenizer(tmp_path)).render(CONVERSATION)
    tok = build_tokenizer()
    assert tok.encode(text, add_special_tokens=False).ids == expected
    assert tok.decode(expected, skip_special_tokens=False) == text
    assert tok.token_to_id("</think>") == 261 and tok.get_vocab_size() == 271


def test_a_chat_template_file_and_its_kwargs(tiny_checkpoint):
    from entrypoints.chat_format import ChatFormatError, ChatFormatter
    from entrypoints.openai_requests import InvalidParameter, chat_request

    template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if tools %}<tools:{{ tools | length }}>{% endif %}{% if thinking %}<think>{% endif %}"
                "{% if fail %}{{ raise_exception('no') }}{% endif %}")
    chat = ChatFormatter(tiny_checkpoint, template)
    messages = [{"role": "user", "content": "hi"}]
    assert chat.render(messages) == "[user]hi"
    assert chat.render(messages, [{"type": "function", "function": {"name": "f"}}], {"thinking": True}) == \
        "[user]hi<tools:1><think>"
    with pytest.raises(ChatFormatError, match="template failed"):
        chat.render(messages, None, {"fail": True})
    _, parsed = chat_request({"messages": messages, "chat_template_kwargs": {"thinking": True}})
    assert parsed.template_kwargs == {"thinking": True}
    for bad in ({"tokenize": True}, {"not an identifier": 1}, "thinking", {f"k{i}": 1 for i in range(33)}):
        with pytest.raises(InvalidParameter) as e:
            chat_request({"messages": messages, "chat_template_kwargs": bad})
        assert e.value.param == "chat_template_kwargs"
