"""The OpenAI-compatible HTTP server end to end: a real `mlaserve serve --http-port` process on
loopback, driven by the official `openai` client (and raw HTTP where a client would not send it),
against the offline API's greedy outputs on the same checkpoint and engine settings."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPConnection

import openai
import pytest

from entrypoints.chat_format import ChatFormatter
from tests.server_util import ENGINE_ARGS, ServerProcess, left_running

PROMPTS = ["The quick brown fox", "1, 2, 3,", "hello world", "Once upon a time"]
MAX_TOKENS = 8


class HttpServer(ServerProcess):
    def __init__(self, checkpoint, *extra: str):
        super().__init__(["--model", str(checkpoint), "--http-port", "0", *ENGINE_ARGS, *extra],
                         r"as '([^']+)' on (http://\S+)/v1")
        self.model, self.url = self.match.group(1), self.match.group(2)
        self.metrics_url = self.url + "/metrics"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def post(self, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


@pytest.fixture(scope="module")
def http(tiny_checkpoint):
    s = HttpServer(tiny_checkpoint)
    yield s
    assert s.stop() == 0, s.log
    assert not left_running(s.children), "engine processes left running"


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    """Greedy outputs of the offline API, for the completions' prompts and the chats' renderings."""
    from engine import LLM, SamplingParams

    chat = [ChatFormatter(tiny_checkpoint).render([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with LLM(tiny_checkpoint, dtype="float32", kv_cache_memory=40_000_000, block_size=16,
             max_num_batched_tokens=256) as llm:
        outs = llm.generate(PROMPTS + chat, params, use_tqdm=False)
    return {"completion": outs[:len(PROMPTS)], "chat": outs[len(PROMPTS):]}


def test_completions_match_the_offline_api_whole_and_streamed(http, offline):
    client = http.client()
    for prompt, ref in zip(PROMPTS, offline["completion"]):
        r = client.completions.create(model=http.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ref.prompt_token_ids), len(ref.token_ids))
        chunks = list(client.completions.create(model=http.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # Several prompts in one request: choices in prompt order; token ids as prompts; echo.
    r = client.completions.create(model=http.model, prompt=PROMPTS[:2], max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in offline["completion"][:2]]
    ref = offline["completion"][2]
    r = client.completions.create(model=http.model, prompt=ref.prompt_token_ids, max_tokens=MAX_TOKENS,
                                  temperature=0)
    assert r.choices[0].text == ref.text
    r = client.completions.create(model=http.model, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                                  echo=True)
    assert r.choices[0].text == PROMPTS[2] + ref.text


def test_chat_matches_the_offline_api_on_the_rendered_prompt(http, offline):
    client = http.client()
    for prompt, ref in zip(PROMPTS, offline["chat"]):
        messages = [{"role": "user", "content": prompt}]
        r = client.chat.completions.create(model=http.model, messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == ref.text
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        chunks = list(client.chat.completions.create(model=http.model, messages=messages, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text


def test_n_completions_and_logprobs(http):
    client = http.client()
    r = client.completions.create(model=http.model, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=7, n=3,
                                  logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices) == 18
    for c in r.choices:
        assert len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs) == 6
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert all(1 <= len(t) <= 2 for t in c.logprobs.top_logprobs)
    chat = client.chat.completions.create(model=http.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)
    # Greedy: the chosen token is the best alternative.
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_64_concurrent_streaming_clients_each_get_the_offline_text(http, offline):
    async def one(client, i):
        prompt, ref = PROMPTS[i % len(PROMPTS)], offline["completion"][i % len(PROMPTS)]
        stream = await client.completions.create(model=http.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        return text == ref.text

    async def main():
        client = openai.AsyncOpenAI(base_url=http.url + "/v1", api_key="none", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    assert all(asyncio.run(main()))


BAD = [({"temperature": -1}, "temperature"), ({"top_p": 2.0}, "top_p"), ({"max_tokens": -3}, "max_tokens"),
       ({"n": 100000}, "n"), ({"seed": 2 ** 70}, "seed"), ({"stop": ["x"] * 1000}, "stop"),
       ({"logprobs": 99}, "logprobs"), ({"prompt": 5}, "prompt"), ({"bogus": 1}, "bogus"),
       ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"presence_penalty": "high"}, "presence_penalty"),
       ({"stream": "yes"}, "stream"), ({"prompt": [[1, 2], [10 ** 12]]}, None), ({"top_k": -5}, "top_k")]


def test_each_bad_parameter_is_a_400_naming_it_while_others_stream(http, offline):
    ref = offline["completion"][3]
    got = {}

    def bystander():
        chunks = http.client().completions.create(model=http.model, prompt=PROMPTS[3], max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True)
        got["text"] = "".join(c.choices[0].text for c in chunks if c.choices)

    t = threading.Thread(target=bystander)
    t.start()
    for override, param in BAD:
        status, body = http.post("/v1/completions", {"prompt": "hi", "max_tokens": 4, **override})
        assert status == 400, (override, body)
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"], body
        if param is not None:
            assert body["error"]["param"] == param, (override, body)
    status, body = http.post("/v1/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400
    host, port = http.url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=30)  # a body announced too long is refused before it comes
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    status, body = http.post("/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = http.post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "messages" and "role" in body["error"]["message"]
    status, body = http.post("/v1/completions", {"model": "gpt-4", "prompt": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        http.client().completions.create(model=http.model, prompt="hi", temperature=-1)
    t.join(timeout=120)
    assert got["text"] == ref.text


def test_a_client_gone_mid_stream_has_its_request_aborted_and_its_blocks_freed(http):
    before = http.metric("mlaserve:request_success_total", finished_reason="abort")
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(http.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=60)
    for _ in range(3):
        assert r.readline()  # streaming
    assert http.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v > 0) > 0  # (stats come 4 times a second)
    r.close()
    assert http.wait_metric("mlaserve:request_success_total", lambda v: v > before, finished_reason="abort") > before
    assert http.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0
    assert http.wait_metric("mlaserve:num_requests_running", lambda v: v == 0) == 0


def test_a_client_gone_before_its_whole_answer_has_its_request_aborted(http):
    before = http.metric("mlaserve:request_success_total", finished_reason="abort")
    host, port = http.url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[1], "max_tokens": 2000, "temperature": 0,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})
    assert http.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v > 0) > 0
    conn.sock.close()  # gone before the answer
    assert http.wait_metric("mlaserve:request_success_total", lambda v: v > before, finished_reason="abort") > before
    assert http.wait_metric("mlaserve:kv_cache_usage_perc", lambda v: v == 0) == 0


def test_models_health_tokenize_detokenize(http):
    models = http.client().models.list()
    assert [m.id for m in models.data] == [http.model]
    assert http.get("/health") == (200, "ok")
    status, body = http.post("/tokenize", {"prompt": "hello"})
    assert status == 200 and body["count"] == len(body["tokens"]) == 5
    status, back = http.post("/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["prompt"] == "hello"
    assert http.post("/detokenize", {"tokens": [-1]})[0] == 400


def test_the_api_key_is_required_when_set_and_health_fails_when_the_engine_dies(tiny_checkpoint):
    s = HttpServer(tiny_checkpoint, "--api-key", "sesame", "--worker-heartbeat-timeout", "3")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.client(api_key="sesame").completions.create(model=s.model, prompt="hi", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        assert s.get("/health")[0] == 200  # no key needed
        engine = sorted(p for p in s.children if b"run_child" in open(f"/proc/{p}/cmdline", "rb").read())
        subprocess.run(["kill", "-9", str(engine[1])], check=True)  # the worker
        deadline = time.monotonic() + 30
        while s.get("/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        status, text = s.get("/health")
        assert status == 503 and "engine_dead" in text, text
        status, body = s.post("/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer sesame"})
        assert status == 503 and "engine failed" in body["error"]["message"]
    finally:
        assert s.stop() == 1  # the engine had failed
        assert not left_running(s.children)


def test_zeromq_and_http_together_share_the_engine_and_drain_on_sigterm(tiny_checkpoint, offline):
    from entrypoints.client import Client

    s = HttpServer(tiny_checkpoint, "--port", "0", "--metrics-port", "0")
    try:
        zmq_line = next(line for line in s.log if "tcp://" in line)
        address = re.search(r"on (tcp://\S+),", zmq_line).group(1)
        ref = offline["completion"][0]
        with Client(address, timeout_s=60) as c:
            final = c.complete(PROMPTS[0], {"max_tokens": MAX_TOKENS, "temperature": 0})
        r = s.client().completions.create(model=s.model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert final.text == r.choices[0].text == ref.text
    finally:
        assert s.stop() == 0, s.log_text()
        assert not left_running(s.children)
