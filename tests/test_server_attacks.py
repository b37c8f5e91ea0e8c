"""Hostile clients against a real `mlaserve serve`: each attack runs while other clients stream,
and those finish whole, with no gap over a second between their tokens, and with the tokens
they get without the attack."""

import os
import signal
import socket
import threading
import time
import urllib.request

import msgspec
import pytest
import zmq

from engine import LLM, SamplingParams
from entrypoints.client import Client, ServerError
from entrypoints.engine_client import EngineDeadError
from entrypoints.protocol import PROTOCOL_VERSION, Delta, Error, Final
from tests.server_util import RunningServer, left_running

BYSTANDER_PROMPTS = ["The quick brown fox", "Mixture of experts routes", "0123456789", "hello there"]
BYSTANDER_PARAMS = {"max_tokens": 80, "ignore_eos": True, "temperature": 0.0}
MAX_GAP_S = 1.0


class Bystanders:
    """Clients streaming greedy requests on threads of their own while the test attacks."""

    def __init__(self, server: RunningServer):
        self.server = server
        self.results: list[tuple[list[float], Final | Exception]] = [None] * len(BYSTANDER_PROMPTS)
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(len(BYSTANDER_PROMPTS))]
        self.started = threading.Barrier(len(BYSTANDER_PROMPTS) + 1)
        self.progress = ["not connected"] * len(BYSTANDER_PROMPTS)  # what a stalled start reports

    def _one(self, i: int) -> None:
        times: list[float] = []
        first = True
        try:
            with Client(self.server.address, timeout_s=60) as c:
                self.progress[i] = "connected"
                stream = c.generate(BYSTANDER_PROMPTS[i], BYSTANDER_PARAMS)
                self.progress[i] = "sent"
                for ev in stream:
                    self.progress[i] = f"{len(times)} tokens, last event {type(ev).__name__}"
                    if isinstance(ev, Delta) and ev.token_ids:
                        times.append(time.monotonic())
                        if first:
                            first = False
                            self.started.wait(timeout=60)
                    elif isinstance(ev, Final):
                        self.results[i] = (times, ev)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.results[i] = (times, e)
            if first:
                self.started.abort()

    def __enter__(self):
        for t in self.threads:
            t.start()
        began = time.monotonic()
        try:
            self.started.wait(timeout=60)  # every bystander streams before the attack begins
        except threading.BrokenBarrierError:
            waited = time.monotonic() - began
            for t in self.threads:
                t.join(timeout=5)
            raise AssertionError(f"the bystanders did not all stream within {waited:.1f} s: "
                                 + "; ".join(f"{i}: {p}, result {r[1] if r else None!r}"
                                             for i, (p, r) in enumerate(zip(self.progress, self.results)))) from None
        return self

    def __exit__(self, *exc) -> None:
        for t in self.threads:
            t.join(timeout=120)

    def check(self, reference: list[list[int]]) -> float:
        """Asserts every bystander finished whole with its reference tokens; returns the worst gap."""
        worst = 0.0
        for (times, final), want in zip(self.results, reference):
            assert isinstance(final, Final), final
            assert final.finish_reason == "length" and final.token_ids == want
            gaps = [b - a for a, b in zip(times, times[1:])]
            worst = max([worst, *gaps])
        assert worst < MAX_GAP_S, f"a bystander waited {worst:.2f} s between two tokens"
        print(f" [worst gap between a bystander's tokens: {1000 * worst:.0f} ms]", end="")
        return worst


def greedy(server: RunningServer, prompt: str, max_tokens: int = 80) -> list[int]:
    with Client(server.address, timeout_s=60) as c:
        return c.complete(prompt, {**BYSTANDER_PARAMS, "max_tokens": max_tokens}).token_ids


@pytest.fixture(scope="module")
def reference(server):
    return [greedy(server, p) for p in BYSTANDER_PROMPTS]


def raw_reply(server: RunningServer, payload: bytes, timeout_s: float = 30.0):
    with Client(server.address, timeout_s=timeout_s) as c:
        c.send_raw(payload)
        return c.recv()


def generate_frame(request_id: str, params: dict, **fields) -> bytes:
    return msgspec.msgpack.encode({"type": "generate", "request_id": request_id, "prompt": "x",
                                   "params": params, **fields})


def test_a_deeply_nested_frame_is_a_bad_message(server, reference):
    with Bystanders(server) as b:
        for frame, why in ((b"\x81\xa1a" * 1000 + b"\xc0", "recursion"),  # maps nested 1000 deep
                           (b"\x82\xa4type\xa8generate\xa6params" + b"\x91" * 100_000 + b"\xc0", "recursion"),
                           (b"\x91" * 100_000 + b"\xc0", "Expected `object`, got `array`")):  # refused at its head
            err = raw_reply(server, frame)
            assert isinstance(err, Error) and err.code == "bad_message" and why in err.message, err
    b.check(reference)
    assert greedy(server, BYSTANDER_PROMPTS[0]) == reference[0]


@pytest.mark.parametrize("params, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty must be a finite number, got nan"),
    ({"top_p": float("-inf")}, "top_p must be a finite number"),
    ({"seed": 2**64 - 1, "n": 2}, "seed must be a 64-bit signed integer"),
    ({"max_tokens": 2**64 - 1}, "max_tokens must be in"),
    ({"logit_bias": {"5": 1.0}}, "invalid sampling parameters"),
    ({"bad_words": ["w"] * 20_000}, r"length <= 1024 - at `\$.bad_words`"),
    ({"stop": ["s"] * 10_000}, r"length <= 128 - at `\$.stop`"),
])
def test_bad_numbers_and_overlong_lists_fail_that_request_alone(server, reference, params, message):
    with Bystanders(server) as b:
        start = time.monotonic()
        err = raw_reply(server, generate_frame("bad", params))
        assert isinstance(err, Error) and err.code == "invalid_request" and err.request_id == "bad", err
        assert pytest.importorskip("re").search(message, err.message), err.message
        assert time.monotonic() - start < MAX_GAP_S
    b.check(reference)


def test_a_seed_at_the_top_of_int64_wraps_for_the_next_completion(server):
    with Client(server.address, timeout_s=60) as c:
        final = c.complete("x", {"seed": 2**63 - 1, "n": 2, "max_tokens": 4, "ignore_eos": True})
    assert [len(x.token_ids) for x in final.completions] == [4, 4]


def test_the_most_stop_strings_and_bad_words_do_not_slow_others(server, reference):
    many = {"max_tokens": 60, "ignore_eos": True, "stop": [f"never{i}" * 20 for i in range(128)],
            "bad_words": [f"w{i}" for i in range(1024)]}
    with Bystanders(server) as b:
        with Client(server.address, timeout_s=120) as c:
            for i in range(16):  # in flight together
                c.send_raw(generate_frame(f"heavy{i}", many, stream=False))
            finals = [c.recv() for _ in range(16)]
    assert all(isinstance(f, Final) and len(f.token_ids) == 60 for f in finals), finals[:2]
    b.check(reference)


def test_non_streaming_clients_that_leave_have_their_requests_aborted(server, reference):
    server.wait_metric("mlaserve:num_requests_running", lambda v: v == 0)
    aborted = server.metric("mlaserve:request_success_total", finished_reason="abort")
    with Bystanders(server) as b:
        clients = [Client(server.address, timeout_s=60) for _ in range(8)]
        for i, c in enumerate(clients):
            c.send_raw(generate_frame(f"leave{i}", {"max_tokens": 3000, "ignore_eos": True}, stream=False))
        assert server.wait_metric("mlaserve:num_requests_running", lambda v: v >= 8) >= 8
        for c in clients:
            c.close()
    b.check(reference)
    assert server.wait_metric("mlaserve:num_requests_running", lambda v: v == 0) == 0
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0
    deadline = time.monotonic() + 10
    while server.metric("mlaserve:request_success_total", finished_reason="abort") < aborted + 8:
        assert time.monotonic() < deadline, "the departed clients' requests were not counted as aborted"
        time.sleep(0.1)


def test_one_connection_cannot_take_every_slot(server, reference):
    # The default: one connection may hold half of max_num_seqs (256) unfinished completions.
    with Client(server.address, timeout_s=60) as greedy_user, Client(server.address, timeout_s=60) as other, \
            Bystanders(server) as b:
        with pytest.raises(ServerError) as e:
            greedy_user.complete("x", {"n": 256, "max_tokens": 4000, "ignore_eos": True})
        assert e.value.code == "limit_exceeded" and "--max-completions-per-client" in e.value.message
        hog = greedy_user.generate("x", {"n": 128, "max_tokens": 4000, "ignore_eos": True}, request_id="hog")
        next(hog)
        with pytest.raises(ServerError) as e:  # the connection is at its limit
            greedy_user.complete("y", {"max_tokens": 2}, request_id="one-more")
        assert e.value.code == "limit_exceeded"
        final = other.complete("another user", {"max_tokens": 8, "ignore_eos": True})
        assert len(final.token_ids) == 8
        greedy_user.abort("hog")
        assert isinstance(list(hog)[-1], Final)
    b.check(reference)
    assert server.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0


def test_a_reused_routing_id_gets_nothing_of_the_departed_client(server, reference):
    ctx = zmq.Context()

    def dealer(routing_id: bytes) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.address)
        return sock

    try:
        with Bystanders(server) as b:
            victim = dealer(b"same-id")
            victim.send(generate_frame("secret", {"max_tokens": 200, "ignore_eos": True}, stream=False))
            assert server.wait_metric("mlaserve:num_requests_running", lambda v: v >= 5) >= 5
            victim.close()
            # Until the server's ROUTER has seen the victim's connection close, libzmq (without
            # ROUTER_HANDOVER) may ignore a second peer with that routing id; such a thief comes
            # back on a new connection, as a real one would, then listens on for the victim's tokens.
            got = []
            thief = heard = None
            asked = 0.0
            deadline = time.monotonic() + 30
            while heard is None or time.monotonic() < heard + 5:  # the victim's 200 tokens take well under 5 s
                if heard is None and (thief is None or time.monotonic() - asked > 1.0):
                    assert time.monotonic() < deadline, "the thief's health requests were never answered"
                    if thief is not None:
                        thief.close()
                    thief = dealer(b"same-id")
                    thief.send(msgspec.msgpack.encode({"type": "health"}))
                    asked = time.monotonic()
                if thief.poll(100):
                    got.append(msgspec.msgpack.decode(thief.recv()))
                    heard = heard or time.monotonic()
            assert {m["type"] for m in got} == {"health_reply"}, got  # nothing of "secret"
    finally:
        ctx.destroy(linger=0)  # closes every socket, even after a failed assertion (term() would wait)
    b.check(reference)
    assert server.wait_metric("mlaserve:num_requests_running", lambda v: v == 0) == 0


def test_metrics_threads_are_bounded_and_model_info_has_the_protocol_version(server, reference):
    host, port = server.metrics_url.split("//")[1].split("/")[0].split(":")
    tasks_before = len(os.listdir(f"/proc/{server.proc.pid}/task"))
    with Bystanders(server) as b:
        idle = [socket.create_connection((host, int(port))) for _ in range(200)]
        time.sleep(0.5)
        assert len(os.listdir(f"/proc/{server.proc.pid}/task")) <= tasks_before + 8
        for s in idle:
            s.close()
    b.check(reference)
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(server.metrics_url, timeout=5).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "metrics did not answer once the idle sockets closed"
            time.sleep(0.2)
    with Client(server.address, timeout_s=30) as c:
        assert c.model_info().protocol_version == PROTOCOL_VERSION == 3


@pytest.mark.parametrize("which, cause", [("worker", "WorkerGone: worker rank 0 is stuck"),
                                          ("scheduler", "the scheduler process is stuck")])
def test_a_stopped_engine_process_fails_every_request_naming_it(tiny_checkpoint, which, cause):
    s = RunningServer(tiny_checkpoint, "--worker-heartbeat-timeout", "3")
    try:
        # The scheduler is spawned first, then the worker (only engine processes run run_child).
        engine = sorted(p for p in s.children if b"run_child" in open(f"/proc/{p}/cmdline", "rb").read())
        pid = engine[1] if which == "worker" else engine[0]
        with Client(s.address, timeout_s=60) as c:
            stream = c.generate("stream", {"max_tokens": 3000, "ignore_eos": True})
            next(stream)
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            with pytest.raises(ServerError) as e:
                list(stream)
            waited = time.monotonic() - stopped
            assert e.value.code == "engine_error" and cause in e.value.message, e.value
            assert waited < 3 + 2, f"the watchdog took {waited:.1f} s"
            print(f"\nwatchdog: SIGSTOP of the {which} to the client's error: {waited:.2f} s (limit 3 s)")
            health = c.health()
            assert health.status == "engine_dead" and cause in health.detail
            assert s.metric("mlaserve:engine_healthy") == 0
            with pytest.raises(ServerError) as e:
                c.complete("after", {"max_tokens": 2})
            assert e.value.code == "engine_error"
        assert s.stop() == 1
        assert cause in s.log_text()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    assert not left_running(s.children)


def test_the_offline_api_after_shutdown_says_it_is_stopped(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", kv_cache_memory=4_000_000, block_size=16)
    out = llm.generate([1.5, [5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert out[0].finish_reason == "error" and len(out[1].token_ids) == 2
    llm.shutdown()
    with pytest.raises(EngineDeadError, match=r"the engine is stopped \(shutdown\(\) was called\)"):
        llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)
