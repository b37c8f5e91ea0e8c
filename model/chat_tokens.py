"""DeepSeek-V3/R1's chat-format tokens, as their tokenizer spells them: one definition for the
tokenizer our checkpoints carry (model/tokenizer_maker.py), their chat template
(model/chat_template.jinja), the demo task, and the frontend's parsers."""

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"

# The format's tokens after BOS and EOS, in the order our tokenizer numbers them (after the bytes).
# As in DeepSeek's tokenizer they are not "special": decoding keeps them, so the reasoning and
# tool-call parsers see them in the text.
FORMAT_TOKENS = (USER, ASSISTANT, THINK_START, THINK_END, CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END, CALLS_END,
                 OUTPUTS_BEGIN, OUTPUT_BEGIN, OUTPUT_END, OUTPUTS_END)


def tool_calls_text(calls: list[tuple[str, str]]) -> str:
    """(name, JSON arguments) calls as DeepSeek-V3 writes them after an answer's content."""
    return CALLS_BEGIN + "".join(f"{CALL_BEGIN}function{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"
                                 for name, arguments in calls) + CALLS_END
