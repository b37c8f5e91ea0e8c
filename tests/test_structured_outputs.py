"""Structured outputs (SamplingParams.structured_outputs, xgrammar): on the tiny random checkpoint,
whose unconstrained output is noise, every completion sampled at temperature 1 obeys its
constraint (a nested JSON schema, a regex, a choice) through the offline API, the ZeroMQ endpoint
and HTTP with the official openai client; the rows around a constrained one are untouched; a
constraint xgrammar refuses fails its request alone. The worker's masks (drafts, rollback) and
the sampler's order of constraints are pinned on their own."""

from __future__ import annotations

import json
import re

import jsonschema
import msgspec
import pytest
import torch

from engine import LLM, SamplingParams
from engine.grammar_cache import GrammarBlobs, PeerGrammars
from engine.messages import GrammarPlan
from engine.request_input import RequestInputError, prepare_request
from engine.sampling_params import StructuredOutputsParams, parse_sampling_params
from entrypoints.client import Client, ServerError
from entrypoints.grammars import GrammarPending, Grammars
from model.grammar_mask import GrammarMasks, apply_bitmask
from model.sampler import SampleRow, speculative_sample
from tests.server_util import left_running
from tests.test_http_server import HttpServer

SCHEMA = {
    "type": "object",
    "properties": {
        # (not maxLength: xgrammar 0.2.9 lets a length-bounded string hold raw control characters,
        # which JSON forbids, and no escapes; mlc-ai/xgrammar#800, docs/structured_outputs.md)
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer",
                                                                                         "minimum": 0, "maximum": 4}},
                "required": ["kind", "legs"]},
    },
    "required": ["name", "age", "pet"],
}
REGEX = r"[a-z]{2,5}-\d{3}( [A-Z]+)?"
CHOICES = ["yes", "no", "a \"quoted\" maybe", "naïve ☃"]
MAX_TOKENS = 240  # room for the schema's longest object
QUOTE, CLOSE = 36, 127  # the tiny checkpoint's tokens for '"' and '}'


def S(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def check(spec: dict, text: str) -> None:
    """The completion obeys the constraint (raises otherwise)."""
    if "json" in spec:
        jsonschema.validate(json.loads(text), spec["json"])
    elif "regex" in spec:
        assert re.fullmatch(spec["regex"], text), text
    elif "choice" in spec:
        assert text in spec["choice"], text
    elif spec.get("json_object"):
        assert isinstance(json.loads(text), dict), text


# The random model writes whitespace wherever JSON allows it, so the JSON constraints here allow
# none (any_whitespace's own test lets it, with room to spare).
SPECS = [{"json": SCHEMA, "disable_any_whitespace": True}, {"regex": REGEX}, {"choice": CHOICES},
         {"json_object": True, "disable_any_whitespace": True}]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", max_model_len=512)
    yield llm
    llm.shutdown()


# ---- the parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, says", [
    ({}, "exactly one of json, regex, choice, grammar and json_object, got none"),
    ({"regex": "a", "choice": ["b"]}, "got regex, choice"),
    ({"choice": []}, "choice must not be empty"),
    ({"json": "x" * ((1 << 18) + 1)}, "characters, more than"),
])
def test_a_constraint_is_exactly_one_kind_and_bounded(kw, says):
    problems = SamplingParams(structured_outputs=S(**kw)).problems(271)
    assert any(says in p for p in problems), problems


def test_hostile_constraints_are_refused_by_name_before_anything_compiles(tiny_checkpoint):
    grammars = Grammars(tiny_checkpoint, 271, 1)
    deep: dict = {}
    cur = deep
    for _ in range(100_000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(RequestInputError, match="structured_outputs.json is not a JSON schema: maximum recursion"):
        prepare_request("hi", {"structured_outputs": {"json": deep}}, None, 512, 271)
    with pytest.raises(ValueError, match="invalid sampling parameters"):  # (a struct is checked by a round trip)
        parse_sampling_params(SamplingParams(structured_outputs=S(json=deep)))
    with pytest.raises(ValueError, match="at `\\$.structured_outputs.choice`"):
        parse_sampling_params({"structured_outputs": {"choice": ["x"] * 5000}})
    with pytest.raises(ValueError, match="structured_outputs"):
        parse_sampling_params({"structured_outputs": {"regex": 5}})
    with pytest.raises(RequestInputError, match="structured_outputs.json is not a JSON schema: Out of range float"):
        prepare_request("hi", {"structured_outputs": {"json": {"type": "number", "maximum": float("nan")}}},
                        None, 512, 271)
    huge = {"enum": ["x" * 1000] * 300}
    with pytest.raises(RequestInputError, match="characters, more than"):
        prepare_request("hi", {"structured_outputs": {"json": huge}}, None, 512, 271)
    assert grammars.prepare(SamplingParams()) is None


def test_equal_constraints_share_a_key_whatever_the_order_of_their_fields():
    a = S(json={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}})
    b = S(json={"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"})
    assert a.key() == b.key() != S(json={"type": "object"}).key()
    assert S(choice=["a", "b"]).key() != S(choice=["a,b"]).key() != S(regex="a|b").key()


@pytest.mark.parametrize("spec, says", [
    ({"json": '{"type": "objectx"}'}, 'structured_outputs.json could not be compiled: Unsupported type "objectx"'),
    ({"json": "not json"}, "structured_outputs.json could not be compiled: Failed to parse JSON"),
    ({"regex": "[a-"}, "structured_outputs.regex could not be compiled: Regex parsing error at position 4"),
    ({"grammar": "root ::= foo"}, 'structured_outputs.grammar could not be compiled: EBNF parser error at line 1, '
                                  'column 10: Rule "foo" is not defined'),
])
def test_what_xgrammar_refuses_is_named_without_its_source_location(tiny_checkpoint, spec, says):
    grammars = Grammars(tiny_checkpoint, 271, 1)
    with pytest.raises(RequestInputError) as e:
        grammars.prepare(SamplingParams(structured_outputs=S(**spec)))
    assert str(e.value).startswith(says) and ".cc:" not in str(e.value), str(e.value)


def test_a_loop_never_compiles_and_a_compiled_constraint_is_cached(tiny_checkpoint):
    grammars = Grammars(tiny_checkpoint, 271, 1)
    params = SamplingParams(structured_outputs=S(regex="[0-9]+"))
    with pytest.raises(GrammarPending):
        grammars.prepare(params, compile=False)
    plan = grammars.prepare(params)
    assert grammars.prepare(params, compile=False) is plan
    assert grammars.prepare(params, start_after=7) == GrammarPlan(plan.key, plan.blob, 7)
    assert grammars.prepare(SamplingParams()) is None


def test_a_blob_crosses_once_while_the_receiver_holds_it_and_again_after_it_was_evicted():
    sender, receiver = PeerGrammars(3), GrammarBlobs(3)
    sent = []
    for key in ["a", "b", "a", "c", "d", "b", "a", "a"]:  # "d" evicts "b"; "b" back evicts "a"
        out = sender.outgoing(GrammarPlan(key, "blob-" + key, 5))
        sent.append(bool(out.blob))
        got = receiver.incoming(out)
        assert got == GrammarPlan(key, "blob-" + key, 5)
    assert sent == [True, True, False, True, True, True, True, False]
    a1, a2 = (receiver.incoming(GrammarPlan("a", "")) for _ in range(2))
    assert a1.blob is a2.blob  # one string for every request of the key
    assert receiver.incoming(GrammarPlan("zzz", "")) is None  # a mirror that diverged is told, not guessed


# ---- the worker's masks and the sampler ----------------------------------------------------------

def _tok(tiny_checkpoint):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))


def _allowed(mask_row: torch.Tensor, vocab: int) -> set[int]:
    return {t for t in range(vocab) if (int(mask_row[t // 32]) >> (t % 32)) & 1}


def test_draft_rows_are_masked_as_the_grammar_stands_after_the_drafts_before_them(tiny_checkpoint):
    vocab = 271
    tok = _tok(tiny_checkpoint)
    plan = Grammars(tiny_checkpoint, vocab, 1).prepare(SamplingParams(structured_outputs=S(choice=["ab", "ac"])))
    masks = GrammarMasks(tiny_checkpoint, vocab, 1)
    g = masks.request(plan, [])
    a, b, c = (tok.token_to_id(x) for x in "abc")
    rows, bitmask = masks.bitmask([(0, g, [a, b])])  # verifying drafts "a", "b": rows before, after a, after ab
    assert rows == [0, 1, 2]
    assert _allowed(bitmask[0], vocab) == {a}
    assert _allowed(bitmask[1], vocab) == {b, c}
    assert _allowed(bitmask[2], vocab) == {1}  # EOS only: the choice is complete
    # the drafts were rolled back: the matcher is where it was, and takes what was emitted
    g.accept([a, c])
    rows, bitmask = masks.bitmask([(5, g, [])])
    assert rows == [5] and _allowed(bitmask[0], vocab) == {1}
    # a draft the grammar refuses ends the masking of its group (its row rejects it)
    g2 = masks.request(plan, [])
    rows, bitmask = masks.bitmask([(0, g2, [b, a])])
    assert rows == [0] and _allowed(bitmask[0], vocab) == {a}


def test_before_its_start_token_a_grammar_constrains_nothing(tiny_checkpoint):
    vocab = 271
    tok = _tok(tiny_checkpoint)
    plan = Grammars(tiny_checkpoint, vocab, 1).prepare(SamplingParams(structured_outputs=S(choice=["x"])), 9)
    masks = GrammarMasks(tiny_checkpoint, vocab, 1)
    g = masks.request(plan, [5, 6])
    assert masks.bitmask([(0, g, [])]) is None
    rows, bitmask = masks.bitmask([(0, g, [7, 9])])  # the start token as a draft: the row after it is masked
    assert rows == [2] and _allowed(bitmask[0], vocab) == {tok.token_to_id("x")}
    assert masks.bitmask([(0, g, [])]) is None  # (the drafts were not taken)
    recomputed = masks.request(plan, [5, 9, tok.token_to_id("x")])  # after a preemption: the output replayed
    rows, bitmask = masks.bitmask([(0, recomputed, [])])
    assert _allowed(bitmask[0], vocab) == {1}


def test_apply_bitmask_matches_xgrammar_and_the_grammar_outranks_the_other_constraints():
    import xgrammar as xgr

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, 10), generator=gen, dtype=torch.int32)
    ours, theirs = logits.clone(), logits.clone()
    apply_bitmask(ours, [1, 3], bitmask[[1, 3]])  # (xgrammar's rows of the mask are the logits' rows)
    xgr.apply_token_bitmask_inplace(theirs, bitmask, indices=[1, 3])
    assert torch.equal(ours, theirs)
    # allowed_token_ids that the grammar forbids leave the grammar's own choice
    one = torch.zeros(10, dtype=torch.int32)
    one[0] = 1 << 4  # only token 4
    rows = [SampleRow("r", SamplingParams(temperature=0, allowed_token_ids=[7]), [0], 1)]
    tokens, _ = speculative_sample(logits[:1], rows, [-1], [1], None, grammar=([0], one[None]))
    assert tokens == [[4]]


# ---- end to end --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=["json", "regex", "choice", "json_object"])
def test_every_sampled_completion_obeys_its_constraint_offline(llm, spec):
    prompts = ["hello", [5, 77, 200, 3]]
    # Any object's keys and strings end only where the random model samples a quote: it is helped
    # to, which also has the grammar's mask compose with logit_bias.
    bias = {QUOTE: 4.0, CLOSE: 4.0} if spec.get("json_object") else {}
    for seed in (1, 2):
        params = SamplingParams(n=8, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, logit_bias=bias,
                                structured_outputs=S(**spec))
        for out in llm.generate(prompts, params, use_tqdm=False):
            assert out.error is None
            for c in out.outputs:
                assert c.finish_reason == "stop", (c.finish_reason, c.text)
                check(spec, c.text)


def test_json_with_any_whitespace_obeys_its_schema(llm):
    params = SamplingParams(n=8, temperature=1.0, seed=4, max_tokens=1000, structured_outputs=S(json=SCHEMA))
    texts = [c.text for c in llm.generate(["hello"], params, use_tqdm=False)[0].outputs]
    assert any(re.search(r"\s", t) for t in texts)
    for t in texts:
        check({"json": SCHEMA}, t)


def test_a_stop_string_ends_a_constrained_output(llm):
    out = llm.generate(["x"], SamplingParams(temperature=1.0, seed=1, max_tokens=20, stop=["cd"],
                                             structured_outputs=S(choice=["abcdef"])), use_tqdm=False)[0]
    assert (out.outputs[0].text, out.outputs[0].finish_reason) == ("ab", "stop")


def test_max_tokens_mid_object_finishes_by_length(llm):
    out = llm.generate(["x"], SamplingParams(temperature=1.0, seed=3, max_tokens=6,
                                             structured_outputs=S(json=SCHEMA)), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].text.lstrip().startswith("{")


def test_one_constrained_request_of_64_leaves_the_others_exactly_as_they_were(llm):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 258, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (64,), generator=g)]
    plain = [SamplingParams(temperature=1.0 if i % 2 else 0.0, seed=i, max_tokens=24, ignore_eos=True)
             for i in range(64)]
    alone = llm.generate(prompts, plain, use_tqdm=False)
    mixed = list(plain)
    # 24 letters exactly, so the constrained request runs as long as it did unconstrained
    mixed[17] = SamplingParams(temperature=1.0, seed=17, max_tokens=24, structured_outputs=S(regex="[a-z]{24}"))
    mixed[40] = SamplingParams(max_tokens=24, structured_outputs=S(regex="[a-"))
    together = llm.generate(prompts, mixed, use_tqdm=False)
    assert re.fullmatch("[a-z]{24}", together[17].outputs[0].text)
    assert together[40].error.startswith("structured_outputs.regex could not be compiled")
    for i in set(range(64)) - {17, 40}:
        assert together[i].outputs[0].token_ids == alone[i].outputs[0].token_ids, i


def test_a_grammar_too_slow_to_match_fails_its_request_alone(llm):
    """An ambiguous grammar's matching grows with every token (this one: tens of ms a token after
    a few hundred); past the worker's limit the request fails, and the batch's others go on."""
    slow = SamplingParams(temperature=1.0, seed=0, max_tokens=400, min_tokens=400,
                          structured_outputs=S(grammar='root ::= x\nx ::= x x x | x x | "a"'))
    other = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    outs = llm.generate(["slow", "other"], [slow, other], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert "the grammar took over 10 ms per token to match 3 times" in outs[0].error
    assert set(outs[0].outputs[0].text) == {"a"}
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 200


def test_constrained_requests_survive_preemption_and_recompute(tiny_checkpoint):
    block = 16
    llm = LLM(tiny_checkpoint, dtype="float32", block_size=block, max_num_batched_tokens=48,
              kv_cache_memory=10 * 576 * 4 * 4 * block)
    try:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, structured_outputs=S(**SPECS[0]))
                  for i in range(6)]
        before = llm.stats()
        outs = llm.generate([[7 + i] * 30 for i in range(6)], params, use_tqdm=False)
        assert llm.stats().num_preemptions > before.num_preemptions
        for out in outs:
            assert out.outputs[0].finish_reason == "stop"
            check({"json": SCHEMA}, out.outputs[0].text)
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def http_and_zmq(tiny_checkpoint):
    s = HttpServer(tiny_checkpoint, "--port", "0")
    s.address = re.search(r"on (tcp://\S+)", s.log_text()).group(1)
    yield s
    assert s.stop() == 0, s.log_text()
    assert not left_running(s.children), "engine processes left running"


@pytest.mark.parametrize("spec", SPECS[:3], ids=["json", "regex", "choice"])
def test_every_completion_obeys_its_constraint_through_the_zeromq_endpoint(http_and_zmq, spec):
    with Client(http_and_zmq.address, timeout_s=120) as c:
        for seed in (1, 2):
            final = c.complete("hello", {"n": 8, "temperature": 1.0, "seed": seed, "max_tokens": MAX_TOKENS,
                                         "structured_outputs": spec})
            assert len(final.completions) == 8
            for completion in final.completions:
                check(spec, completion.text)
        with pytest.raises(ServerError, match="structured_outputs.regex could not be compiled"):
            c.complete("hello", {"structured_outputs": {"regex": "(?P<x>a)"}})
        assert c.complete("still there?", {"max_tokens": 3}).usage.completion_tokens == 3


def test_every_completion_obeys_response_format_through_the_openai_client(http_and_zmq):
    client = http_and_zmq.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in (1, 2):
        r = client.chat.completions.create(model=http_and_zmq.model, messages=[{"role": "user", "content": "hi"}],
                                           n=8, temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
                                           response_format=fmt,
                                           extra_body={"structured_outputs": {"disable_any_whitespace": True}})
        for choice in r.choices:
            check({"json": SCHEMA}, choice.message.content)
    r = client.completions.create(model=http_and_zmq.model, prompt="hi", n=8, temperature=1.0, seed=3,
                                  max_tokens=MAX_TOKENS, logit_bias={str(QUOTE): 4, str(CLOSE): 4},
                                  extra_body={"response_format": {"type": "json_object"},
                                              "structured_outputs": {"disable_any_whitespace": True}})
    for choice in r.choices:
        check({"json_object": True}, choice.text)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=http_and_zmq.model, prompt="hi", temperature=1.0, seed=4, max_tokens=64, stream=True,
        extra_body={"structured_outputs": {"regex": REGEX}}) if chunk.choices)
    check({"regex": REGEX}, streamed)
    r = client.completions.create(model=http_and_zmq.model, prompt="hi", temperature=1.0, seed=5, max_tokens=64,
                                  extra_body={"structured_outputs": {"choice": CHOICES}})
    check({"choice": CHOICES}, r.choices[0].text)


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     'structured_outputs.json could not be compiled: Unsupported type "objectx"'),
    ({"response_format": {"type": "xml"}}, "response_format type must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format json_schema must"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "give the constraint in one"),
    ({"structured_outputs": {"regex": "a", "json_object": True}}, "exactly one of"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
])
def test_bad_constraints_are_400s_naming_them(http_and_zmq, body, says):
    status, reply = http_and_zmq.post("/v1/completions", {"model": http_and_zmq.model, "prompt": "hi", **body})
    assert status == 400 and says in reply["error"]["message"], reply


def test_parsing_the_zeromq_wire_keeps_the_constraint():
    raw = msgspec.msgpack.encode({"structured_outputs": {"json": SCHEMA}})
    params = msgspec.msgpack.decode(raw, type=SamplingParams)
    assert params.structured_outputs.json == SCHEMA


def test_prepare_request_refuses_a_bad_constraint_before_tokenizing(tiny_checkpoint):
    with pytest.raises(RequestInputError, match="exactly one of"):
        prepare_request("hi", {"structured_outputs": {}}, None, 512, 271)


# ---- with speculative decoding, on the demo model -------------------------------------------------

def test_constrained_greedy_outputs_are_the_same_with_mtp_drafts_as_without(tmp_path):
    """The demo model sorts 3-7 digits; the regex asks for seven, so the grammar overrules the
    model's EOS (and the MTP drafts that propose it) until there are. Greedy: the tokens with
    k = 2 drafts verified per step (synchronous scheduling) equal those without drafts (with
    asynchronous scheduling)."""
    from model.demo_checkpoint import default_model_dir
    from model.demo_task import Problem

    regex = r"[^<]*</think>[0-9](,[0-9]){6}"
    prompts = [Problem(d).prompt for d in ("5,1,4,1", "9,0,3", "8,6,7,5,3,0,9", "2,7,1")]
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=S(regex=regex)),
              SamplingParams(temperature=0, max_tokens=48)]
    runs = []
    for spec in (0, 2):
        with LLM(default_model_dir(), dtype="float32", num_speculative_tokens=spec,
                 speculative_draft_policy="fixed") as llm:  # (drafts every step: the grammar meets them)
            outs = llm.generate(prompts * 2, [params[0]] * len(prompts) + [params[1]] * len(prompts), use_tqdm=False)
            runs.append([o.outputs[0].token_ids for o in outs])
            texts = [o.outputs[0].text for o in outs]
            if spec:
                assert llm.stats().spec_accepted_tokens > 0
    assert runs[0] == runs[1]
    for text in texts[: len(prompts)]:
        assert re.fullmatch(regex, text), text
    assert texts[len(prompts)].endswith("</think>1,1,4,5")  # unconstrained, beside them
