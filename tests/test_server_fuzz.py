"""Property-based fuzzing of the serving protocol against a real `mlaserve serve`: frames with
every field of every client message given wrong types, NaN, infinities, huge and negative
integers, long and deeply nested collections. Whatever a frame holds, the server answers it
with a typed message (an Error naming the problem, or a correct result) and keeps serving: a
greedy request afterwards gives the tokens it gave before."""

import time

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrypoints.client import Client
from entrypoints.protocol import Delta, Error, Final, HealthReply, ModelInfo
from tests.server_util import RunningServer

INT_EDGES = [0, 1, -1, 2, 255, 256, 4095, 4096, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1]
FLOAT_EDGES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-300, 1e300, -1.0, 0.5, 2.0, 100.0, 101.0]

# msgpack's whole range of scalars, and collections of them nested a little.
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from(INT_EDGES), st.integers(-(2**63), 2**64 - 1),
                    st.sampled_from(FLOAT_EDGES), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(
    st.one_of(st.text(max_size=8), st.integers(-5, 300)), inner, max_size=6), max_leaves=20)
token_ids = st.lists(st.one_of(st.integers(0, 300), st.sampled_from(INT_EDGES)), max_size=40)
long_lists = st.sampled_from([[0] * 5000, ["s"] * 2000, [[1]] * 3000, list(range(200_000))])

PARAM_FIELDS = ["n", "max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "seed",
                "presence_penalty", "frequency_penalty", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
                "include_stop_str_in_output", "logprobs", "prompt_logprobs", "skip_special_tokens", "logit_bias",
                "allowed_token_ids", "bad_words", "bad_words_token_ids", "truncate_prompt_tokens", "structured_outputs",
                "not_a_field"]
small_float = st.floats(0.0, 2.0) | st.sampled_from(FLOAT_EDGES)
typed_value = {  # values of each field's own type, edges included, beside values of any type
    "n": st.integers(-3, 300) | st.integers(1, 3), "max_tokens": st.sampled_from(INT_EDGES) | st.integers(-2, 8),
    "min_tokens": st.integers(-1, 10), "top_k": st.integers(-2, 400), "seed": st.sampled_from(INT_EDGES),
    "temperature": small_float, "top_p": small_float, "min_p": small_float, "presence_penalty": small_float,
    "frequency_penalty": small_float, "repetition_penalty": small_float, "logprobs": st.integers(-1, 25),
    "prompt_logprobs": st.integers(-1, 25), "truncate_prompt_tokens": st.integers(-2, 10),
    "ignore_eos": st.booleans(), "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
    "stop": st.lists(st.text(max_size=5), max_size=6), "stop_token_ids": token_ids,
    "logit_bias": st.dictionaries(st.integers(-5, 300), st.sampled_from(FLOAT_EDGES), max_size=5),
    "allowed_token_ids": token_ids, "bad_words": st.lists(st.text(max_size=5), max_size=6),
    "bad_words_token_ids": st.lists(token_ids, max_size=4),
    # constraints of every kind, more than one at once, ones xgrammar refuses, and values of any type
    "structured_outputs": st.fixed_dictionaries({}, optional={
        "json": values | st.sampled_from([{"type": "object"}, {"type": "objectx"}, {"enum": [1, float("nan")]},
                                          '{"type": "array"', {"$ref": "#/x"}]),
        "regex": st.text(max_size=12) | st.sampled_from(["[a-", "a{3,2}", "[0-9]{2,4}", "(?P<x>a)"]),
        "choice": st.lists(st.text(max_size=5), max_size=4) | values,
        "grammar": st.text(max_size=20) | st.sampled_from(['root ::= "a" | "b"', "root ::= foo"]),
        "json_object": st.booleans() | values, "disable_any_whitespace": st.booleans() | values}),
}
param_value = {f: st.one_of(values, typed_value.get(f, st.sampled_from(INT_EDGES + FLOAT_EDGES)), long_lists)
               for f in PARAM_FIELDS}
params = st.fixed_dictionaries({}, optional=param_value) | values
# Mostly well-typed parameters with the odd hostile one: these reach the engine and run.
typed_params = st.fixed_dictionaries({"max_tokens": st.integers(1, 6)}, optional={
    f: typed_value[f] for f in PARAM_FIELDS if f in typed_value and f != "max_tokens"})

generate = st.fixed_dictionaries({"type": st.just("generate")}, optional={
    "request_id": st.text(max_size=10) | values | st.just("r" * 10_000),
    "prompt": st.text(max_size=50) | values | st.just("x" * 300_000),
    "prompt_token_ids": token_ids | values | long_lists, "params": params,
    "stream": st.booleans() | values, "priority": st.sampled_from(INT_EDGES) | values})
well_formed = st.fixed_dictionaries({
    "type": st.just("generate"), "request_id": st.text(min_size=1, max_size=10),
    "params": typed_params | params, "stream": st.booleans()}, optional={
    "prompt": st.text(min_size=1, max_size=30)}).map(
    lambda d: d if "prompt" in d else {**d, "prompt_token_ids": [5, 6, 7]})
other = st.fixed_dictionaries({"type": st.sampled_from(["abort", "health", "get_model_info", "launch", ""]) | values},
                              optional={"request_id": st.text(max_size=10) | values, "extra": values})
frames = st.one_of(well_formed.map(msgspec.msgpack.encode), well_formed.map(msgspec.msgpack.encode),
                   generate.map(msgspec.msgpack.encode), other.map(msgspec.msgpack.encode),
                   values.map(msgspec.msgpack.encode), st.binary(max_size=64),
                   st.integers(1, 5000).map(lambda d: b"\x81\xa1a" * d + b"\xc0"),
                   st.integers(1, 5000).map(lambda d: b"\x91" * d + b"\xc0"))

TERMINAL = (Final, Error, HealthReply, ModelInfo)


def answer(server: RunningServer, frame: bytes):
    """The server's answer to a frame: the first message that ends it. A request that runs is
    aborted at its first delta (or after a second without one) so the fuzzing stays quick."""
    with Client(server.address, timeout_s=60) as c:
        c.send_raw(frame)
        deadline = time.monotonic() + 1.0
        aborted = False
        while True:
            try:
                msg = c.recv(timeout_s=0.2 if not aborted else 60)
            except TimeoutError:
                assert not aborted, "no answer within 60 s of the abort"
                msg = None
            if isinstance(msg, TERMINAL):
                return msg
            if not aborted and (isinstance(msg, Delta) or time.monotonic() > deadline):
                rid = msg.request_id if isinstance(msg, Delta) else msgspec.msgpack.decode(frame)["request_id"]
                c.send_raw(msgspec.msgpack.encode({"type": "abort", "request_id": rid}))
                aborted = True


def test_every_frame_gets_a_typed_answer_and_the_server_keeps_serving(server):
    with Client(server.address, timeout_s=60) as c:
        before = c.complete("fuzz", {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}).token_ids
    seen: dict[str, int] = {}
    recent: list[bytes] = []  # the frames before a failure, for its report

    @settings(max_examples=800, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(frames)
    def one(frame):
        recent[:] = [*recent[-4:], frame]
        msg = answer(server, frame)
        key = type(msg).__name__ + (f":{msg.code}" if isinstance(msg, Error) else "")
        seen[key] = seen.get(key, 0) + 1
        assert server.proc.poll() is None, "the server exited"
        if isinstance(msg, Error):
            # An engine failure shows its traceback (the server's log) and the frames that led to it.
            assert msg.code in ("bad_message", "invalid_request", "unknown_request", "limit_exceeded"), \
                f"{msg}\nlast frames: {recent}\nserver log:\n{server.log_text()[-6000:]}"
            assert msg.message
        if isinstance(msg, Final):
            assert msg.finish_reason in ("length", "stop", "abort")

    one()
    print(f"\nanswers over the fuzzed frames: {dict(sorted(seen.items()))}")
    assert seen.get("Error:bad_message") and seen.get("Error:invalid_request") and seen.get("Final")
    with Client(server.address, timeout_s=60) as c:
        assert c.health().status == "ok"
        assert c.complete("fuzz", {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}).token_ids == before
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0
