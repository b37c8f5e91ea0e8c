"""The serving endpoint end to end: a real `mlaserve serve` process on loopback, real clients."""

import asyncio
import signal
import time

import msgspec
import pytest

from engine import LLM, SamplingParams
from entrypoints.client import AsyncClient, Client, ServerError
from entrypoints.protocol import Delta, Final
from tests.server_util import RunningServer, left_running

PROMPTS = ["The quick brown fox", "a", "Mixture of experts routes each token to", "0123456789" * 4, "hello"]


def mixed_requests(n: int):
    reqs = []
    for i in range(n):
        params = {"max_tokens": 4 + (i * 7) % 20, "ignore_eos": True, "temperature": 0.0}
        if i % 3 == 1:  # seeded sampling: the same draws whatever the batch
            params.update(temperature=0.8, top_p=0.9, seed=1000 + i)
        if i % 5 == 2:
            params.update(logprobs=2)
        if i % 10 == 3:
            params.update(prompt_logprobs=3)
        if i % 8 == 4:  # n completions, streamed interleaved by index
            params.update(n=3, temperature=0.9, seed=2000 + i)
        if i % 16 == 7:  # sampling constraints cross the wire (bad words tokenized by the server)
            params.update(logit_bias={100: 3.0, 101: -100.0}, allowed_token_ids=list(range(90, 130)),
                          bad_words=["e", "o"])  # ids 90-129: "X" to "\x7f", lowercase letters among them
        reqs.append((PROMPTS[i % len(PROMPTS)] + " " * (i % 4), params))
    return reqs


def test_64_concurrent_streaming_clients_match_the_offline_api(server, tiny_checkpoint):
    reqs = mixed_requests(64)

    async def one(prompt, params):
        async with AsyncClient(server.address, timeout_s=120) as c:
            deltas, final = [], None
            async for ev in c.generate(prompt, params):
                if isinstance(ev, Delta):
                    deltas.append(ev)
                else:
                    final = ev
            return deltas, final

    async def all_of_them():
        return await asyncio.gather(*(one(p, params) for p, params in reqs))

    results = asyncio.run(all_of_them())
    with LLM(tiny_checkpoint, dtype="float32", kv_cache_memory=40_000_000, block_size=16) as llm:
        offline = llm.generate([p for p, _ in reqs], [SamplingParams(**params) for _, params in reqs],
                               use_tqdm=False)
    for i, ((deltas, final), off, (_, params)) in enumerate(zip(results, offline, reqs)):
        assert isinstance(final, Final) and final.finish_reason == "length"
        n = params.get("n", 1)
        completions = final.completions or [final]
        assert len(completions) == len(off.outputs) == n and final.token_ids == completions[0].token_ids
        for k, (got, want) in enumerate(zip(completions, off.outputs)):
            mine = [d for d in deltas if d.index == k]
            streamed_ids = [t for d in mine for t in d.token_ids]
            assert streamed_ids == got.token_ids == want.token_ids, (i, k, params)
            assert "".join(d.text for d in mine) == got.text == want.text
        assert final.usage.completion_tokens == n * params["max_tokens"]
        if "logprobs" in params:
            assert len([lp for d in deltas for lp in d.logprobs]) == n * params["max_tokens"]
        if "prompt_logprobs" in params:
            assert final.prompt_logprobs[0] is None and off.prompt_logprobs[0] is None
            assert len(final.prompt_logprobs) == len(off.prompt_logprobs) == final.usage.prompt_tokens
            for got, want in zip(final.prompt_logprobs[1:], off.prompt_logprobs[1:]):
                assert (got.token_id, got.rank, got.top_token_ids) == (want.token_id, want.rank, want.top_ids)
                assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        else:
            assert final.prompt_logprobs is None
    assert sum("n" in params for _, params in reqs) == 8 and sum("prompt_logprobs" in p for _, p in reqs) == 7
    for (_, final), (_, params) in zip(results, reqs):
        if "allowed_token_ids" in params:
            assert set(final.token_ids) <= set(params["allowed_token_ids"]) - {101}
            assert final.text and "e" not in final.text and "o" not in final.text


def test_abort_and_disconnect_free_their_blocks(server):
    with Client(server.address, timeout_s=60) as c:
        stream = c.generate("abort me " * 3, {"max_tokens": 3000, "ignore_eos": True}, request_id="long")
        for _ in range(3):
            assert isinstance(next(stream), Delta)
        assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v > 0) > 0
        c.abort("long")
        events = list(stream)
        assert isinstance(events[-1], Final) and events[-1].finish_reason == "abort"
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0
    aborted_before = server.metric("mlaserve:request_success_total", finished_reason="abort")

    c = Client(server.address, timeout_s=60)
    stream = c.generate("disconnect me", {"max_tokens": 3000, "ignore_eos": True})
    next(stream)
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v > 0) > 0
    c.drop_connection()
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0
    deadline = time.monotonic() + 10
    while server.metric("mlaserve:request_success_total", finished_reason="abort") < aborted_before + 1:
        assert time.monotonic() < deadline, "the vanished client's request was not aborted"
        time.sleep(0.1)
    stream.close()
    c.close()


def test_aborting_a_request_of_n_completions_ends_them_all(server):
    with Client(server.address, timeout_s=60) as c:
        stream = c.generate("abort us " * 3, {"n": 4, "max_tokens": 3000, "ignore_eos": True}, request_id="group")
        seen = set()
        while len(seen) < 4:  # every completion is running
            seen.add(next(stream).index)
        c.abort("group")
        final = list(stream)[-1]
        assert isinstance(final, Final) and [x.finish_reason for x in final.completions] == ["abort"] * 4
        assert final.usage.completion_tokens == sum(len(x.token_ids) for x in final.completions)
        with pytest.raises(ServerError, match=r"n must be in \[1, 256\]"):
            c.complete("x", {"n": 257})
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0


@pytest.mark.parametrize("payload,code", [
    (b"\xc1 not msgpack", "bad_message"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": 7, "prompt": "x"}), "bad_message"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "u", "prompt": "x", "colour": 1}), "bad_message"),
    (msgspec.msgpack.encode({"type": "launch_missiles"}), "bad_message"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "p", "prompt": "x", "params": {"top_q": 1}}),
     "invalid_request"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "h", "prompt_token_ids": [5] * 5000}),
     "invalid_request"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "hs", "prompt": "z" * 300_000}), "invalid_request"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "v", "prompt_token_ids": [1, 999]}),
     "invalid_request"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "b", "prompt": "x", "params": {"logit_bias": {3: 1e9}}}),
     "invalid_request"),
    (msgspec.msgpack.encode({"type": "generate", "request_id": "q", "prompt": "x", "priority": 2}),
     "invalid_request"),  # a first-come-first-served server
    (msgspec.msgpack.encode({"type": "generate", "request_id": "q", "prompt": "x", "priority": "high"}), "bad_message"),
    (msgspec.msgpack.encode({"type": "abort", "request_id": "nobody"}), "unknown_request"),
])
def test_malformed_messages_get_typed_errors_and_the_server_keeps_serving(server, payload, code):
    with Client(server.address, timeout_s=30) as c:
        c.send_raw(payload)
        err = c.recv()
        assert type(err).__name__ == "Error" and err.code == code, err
        assert err.message
        final = c.complete("still there?", {"max_tokens": 3})
        assert final.usage.completion_tokens == 3


def test_duplicate_request_id_is_refused(server):
    # Both frames go out back to back, so the first request is still running when the server reads the
    # second whatever the machine's speed (waiting for a first token raced a fast machine's 2000 tokens).
    first = {"type": "generate", "request_id": "same", "prompt": "one",
             "params": {"max_tokens": 2000, "ignore_eos": True}}
    second = {"type": "generate", "request_id": "same", "prompt": "two", "params": {"max_tokens": 2}}
    with Client(server.address, timeout_s=30) as c:
        c.send_raw(msgspec.msgpack.encode(first))
        c.send_raw(msgspec.msgpack.encode(second))
        seen = []
        while not any(type(m).__name__ == "Error" for m in seen):
            seen.append(c.recv())
            assert not isinstance(seen[-1], Final), "the first request ended before the duplicate was refused"
        err = seen[-1]
        assert err.code == "duplicate_request_id" and err.request_id == "same", err
        c.send_raw(msgspec.msgpack.encode({"type": "abort", "request_id": "same"}))
        while not isinstance(m := c.recv(), Final):
            assert isinstance(m, Delta), m
        assert m.finish_reason == "abort"


def test_metrics_parse_and_count_what_was_returned(server):
    server.wait_metric("mlaserve:num_requests_running", lambda v: v == 0)
    time.sleep(0.6)  # the server refreshes its snapshot every 0.25 s
    before = server.metrics()
    with Client(server.address, timeout_s=60) as c:
        finals = [c.complete(p, {"max_tokens": n, "ignore_eos": True}) for p, n in [("abc", 5), ("xyz", 9)]]
    returned = sum(len(f.token_ids) for f in finals)
    time.sleep(0.6)  # the server refreshes its snapshot every 0.25 s
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("mlaserve:generation_tokens_total") == returned
    assert delta("mlaserve:request_success_total", finished_reason="length") == 2
    assert delta("mlaserve:time_to_first_token_seconds_count") == 2
    assert delta("mlaserve:e2e_request_latency_seconds_count") == 2
    assert delta("mlaserve:request_generation_tokens_sum") == returned
    assert delta("mlaserve:inter_token_latency_seconds_count") == returned - 2
    assert after[("mlaserve:kv_cache_num_blocks", ())] > 0


def test_sigterm_finishes_in_flight_refuses_new_and_exits_clean(tiny_checkpoint):
    s = RunningServer(tiny_checkpoint, "--shutdown-grace", "300")
    with Client(s.address, timeout_s=60) as c, Client(s.address, timeout_s=60) as late:
        # long enough to still be running after the signal on a fast machine
        stream = c.generate("finish me", {"max_tokens": 1500, "ignore_eos": True})
        next(stream)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(ServerError) as e:
            late.complete("too late", {"max_tokens": 2})
        assert e.value.code == "shutting_down"
        events = list(stream)
        assert isinstance(events[-1], Final) and events[-1].finish_reason == "length"
        assert len(events[-1].token_ids) == 1500
    assert s.proc.wait(timeout=60) == 0
    assert not left_running(s.children)
