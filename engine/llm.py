"""The offline batch API: LLM(model_dir, ...).generate(prompts, params)."""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import socket
import tempfile
import time
from pathlib import Path

import zmq
from tokenizers import Tokenizer

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_core import run_engine_core
from engine.messages import (
    AbortRequests,
    AddRequest,
    EngineDead,
    EngineHeartbeat,
    EngineReady,
    EngineStats,
    GetStats,
    RequestDelta,
    RequestOutputs,
    SchedulerToFrontend,
    Shutdown,
    completion_ids,
)
from engine.model_config import ModelConfig
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.processes import Channel, spawn
from engine.request_input import RequestInputError, check_priority, prepare_request
from engine.worker_process import run_worker


class EngineDeadError(RuntimeError):
    pass


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_fits_model(config: EngineConfig, cfg: ModelConfig) -> None:
    """Options that cannot work with this checkpoint fail here, before any process starts."""
    config.served_model_len(cfg.max_position_embeddings)
    if config.ep_size > 1 and cfg.n_routed_experts % config.ep_size:
        raise ValueError(f"ep_size {config.ep_size} does not divide the model's {cfg.n_routed_experts} routed experts")
    if config.num_speculative_tokens and cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"num_speculative_tokens={config.num_speculative_tokens} needs the checkpoint's MTP module, "
                         f"and {config.model_dir} has none (num_nextn_predict_layers is 0)")


class EngineClient:
    """Starts the scheduler and worker processes and talks to the scheduler; stops them all."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0):
        self._dir = tempfile.mkdtemp(prefix="mlaserve-")
        if config.node_rank != 0:
            raise ValueError("the frontend and scheduler run on node 0; other nodes run `mlaserve worker`")
        addrs = {k: f"ipc://{self._dir}/{k}" for k in ("input", "output")}
        self._ctx = zmq.Context()
        self.outputs = Channel(self._ctx, zmq.PULL, addrs["output"], bind=True, decode_type=SchedulerToFrontend)
        model_cfg = ModelConfig.from_checkpoint(config.model_dir)
        _check_fits_model(config, model_cfg)
        eos = model_cfg.eos_token_id
        if config.ep_size > 1 and config.master_port == 0:
            config = dataclasses.replace(config, master_port=_free_port(config.master_addr))
        links = config.worker_links(bind=False, ipc_dir=self._dir)
        self.procs = [spawn(run_engine_core, config, {**addrs, **config.worker_links(bind=True, ipc_dir=self._dir)},
                            eos, startup_timeout_s)]
        self.procs += [spawn(run_worker, config, r, links[f"plans{r}"], links["results"]) for r in config.local_ranks]
        self.inputs = Channel(self._ctx, zmq.PUSH, addrs["input"], bind=False, decode_type=None)
        self.stopped: str | None = None  # why the engine no longer runs, once it does not
        self.heartbeat_timeout_s = config.worker_heartbeat_timeout_s
        self.last_heard = time.monotonic()
        self._beating = False
        atexit.register(self.shutdown)
        try:
            ready = self.recv(timeout_s=startup_timeout_s)
            if not isinstance(ready, EngineReady):
                raise EngineDeadError(f"engine did not start: {ready}")
        except BaseException:
            self.shutdown()
            raise
        self.ready: EngineReady = ready
        self._beating = True  # from here on the scheduler sends heartbeats

    def send(self, msg) -> None:
        self._check_running()
        self.inputs.send(msg)

    def _check_running(self) -> None:
        if self.stopped is not None:
            raise EngineDeadError(f"the engine is stopped ({self.stopped}); start a new one")

    def recv(self, timeout_s: float | None = None):
        """The next message from the scheduler; raises EngineDeadError if a process died or the
        scheduler went silent (it beats every half second once ready)."""
        self._check_running()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while deadline is None or time.monotonic() < deadline:
            msg = self.poll(timeout_ms=200)
            if isinstance(msg, EngineDead):
                raise EngineDeadError(f"the engine failed:\n{msg.reason}")
            if msg is not None:
                return msg
            if (failure := self.failure()) is not None:
                raise EngineDeadError(failure)
        raise EngineDeadError(f"no answer from the engine within {timeout_s} s")

    def poll(self, timeout_ms: int = 0):
        """The next message but heartbeats (which are noted), or None."""
        while (msg := self.outputs.recv(timeout_ms=timeout_ms)) is not None:
            self.last_heard = time.monotonic()
            if not isinstance(msg, EngineHeartbeat):
                return msg
            timeout_ms = 0
        return None

    def failure(self) -> str | None:
        """Why the engine no longer runs, seen from here: a process that died, or a scheduler
        (ready, so beating) that has sent nothing for the heartbeat timeout."""
        dead = [p for p in self.procs if not p.is_alive()]
        if dead:
            return f"engine process {dead[0].name} exited with code {dead[0].exitcode}"
        silent = time.monotonic() - self.last_heard
        if self._beating and silent > self.heartbeat_timeout_s:
            return (f"the scheduler process is stuck: nothing from it for {silent:.1f} s (the limit is "
                    f"{self.heartbeat_timeout_s:g} s); the process is stopped or hung")
        return None

    def shutdown(self, why: str = "shutdown() was called") -> None:
        if self.stopped is None:
            self.stopped = why
        if not self.procs:
            return
        try:
            self.inputs.send(Shutdown())
        except zmq.ZMQError:
            pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.procs = []
        self.inputs.close()
        self.outputs.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.shutdown)


class _Tracked:
    """One completion of a request being collected."""

    def __init__(self, out: RequestOutput, index: int, detok: IncrementalDetokenizer, want_logprobs: bool):
        self.out = out
        self.completion = out.outputs[index]
        self.detok = detok
        if want_logprobs:
            self.completion.logprobs = []

    def apply(self, d: RequestDelta) -> bool:
        """Folds a delta in; returns True if a stop string ended the completion here."""
        out, c = self.out, self.completion
        c.token_ids.extend(d.new_token_ids)
        if c.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        if out.prompt_logprobs is not None:
            out.prompt_logprobs.extend(d.prompt_logprobs)  # (only the first completion computes them)
        m = out.metrics
        if m is not None:
            m.scheduled_time = m.scheduled_time or d.scheduled_time
            m.first_token_time = m.first_token_time or d.first_token_time
            if c.index == 0:
                m.num_cached_tokens = d.num_cached_tokens or m.num_cached_tokens
        stopped = bool(d.new_token_ids) and self.detok.add(d.new_token_ids)
        if stopped:
            c.finish_reason = "stop"
        elif d.finished:
            c.finish_reason = d.finish_reason
            out.error = out.error or d.error
            self.detok.flush()
        c.text = self.detok.text
        if out.finished and m is not None:
            m.finish_time = d.finish_time or time.time()
        return stopped


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: str = "bfloat16", max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 256, block_size: int = 64, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, enable_prefix_caching: bool = True, seed: int = 0,
                 max_model_len: int | None = None,
                 kv_cache_memory_fraction: float = 0.05, startup_timeout_s: float = 600.0,
                 device: str = "auto", num_speculative_tokens: int = 0, ep_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int = 0, nnodes: int = 1, scheduler_port: int = 0,
                 async_scheduling: bool = True, kv_cache_dtype: str = "auto", cuda_graphs: bool = False,
                 batch_invariant: bool = False, scheduling_policy: str = "fcfs",
                 worker_heartbeat_timeout_s: float = 5.0):
        if model is None:  # the embedded demo model, trained on first use if it is not shipped
            from model.demo_checkpoint import default_model_dir

            model = default_model_dir()
        self.config = EngineConfig(
            model_dir=str(model), dtype=dtype, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_fraction=kv_cache_memory_fraction,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed, device=device, num_speculative_tokens=num_speculative_tokens, ep_size=ep_size,
            master_addr=master_addr, master_port=master_port, nnodes=nnodes, scheduler_port=scheduler_port,
            async_scheduling=async_scheduling, kv_cache_dtype=kv_cache_dtype, cuda_graphs=cuda_graphs,
            batch_invariant=batch_invariant, scheduling_policy=scheduling_policy,
            worker_heartbeat_timeout_s=worker_heartbeat_timeout_s)
        self.tokenizer = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
        self.engine = EngineClient(self.config, startup_timeout_s)
        self._next_id = 0

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.ready.kv_cache_tokens

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def stats(self) -> EngineStats:
        self.engine.send(GetStats())
        while True:
            msg = self.engine.recv(timeout_s=60)
            if isinstance(msg, EngineStats):
                return msg

    def generate(self, prompts, params=None, use_tqdm: bool = True,
                 priority: list[int] | None = None) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. params: a SamplingParams
        or dict for all, or a list with one per prompt. priority: one int per prompt, lower sooner
        (an engine started with scheduling_policy="priority"). A request with bad input comes back
        with finish_reason "error" and `error` naming the problem; the others run normally."""
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt (a string, token ids, or something _submit refuses by name)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling parameters for {len(prompts)} prompts")
        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        tracked: dict[str, _Tracked] = {}  # by engine request id: one per completion
        outs: list[RequestOutput] = []
        try:
            for prompt, p, rank in zip(prompts, plist, priorities):
                outs.append(self._submit(prompt, p, tracked, rank))
            self._collect(tracked, len(outs), use_tqdm and len(prompts) > 1)
        except BaseException as e:
            # Ctrl-C or a dead engine: stop every process before the exception leaves.
            self.engine.shutdown(f"a generate() call ended with {type(e).__name__}")
            raise
        return outs

    def _submit(self, prompt, raw_params, tracked: dict[str, _Tracked], priority: int = 0) -> RequestOutput:
        req_id = str(self._next_id)
        self._next_id += 1
        text = prompt if isinstance(prompt, str) else None
        out = RequestOutput(req_id, text, [], metrics=RequestMetrics(arrival_time=time.time()))
        ready = self.engine.ready
        try:
            priority = check_priority(priority)
            ids, params = prepare_request(prompt, raw_params, self.tokenizer, ready.max_model_len, ready.vocab_size)
        except RequestInputError as e:  # that prompt alone fails, with one output per completion asked for
            n = len(completion_ids(req_id, e.params.n)) if e.params is not None else 1
            out.outputs = [CompletionOutput(i, finish_reason="error") for i in range(n)]
            out.error = str(e)
            return out
        out.prompt_token_ids = ids
        engine_ids = completion_ids(req_id, params.n)
        out.outputs = [CompletionOutput(i) for i in range(len(engine_ids))]
        if params.prompt_logprobs is not None:
            out.prompt_logprobs = []
        for i, engine_id in enumerate(engine_ids):
            tracked[engine_id] = _Tracked(out, i, IncrementalDetokenizer(self.tokenizer, params),
                                          params.logprobs is not None)
        self.engine.send(AddRequest(req_id, ids, params, out.metrics.arrival_time, priority))
        return out

    def _collect(self, tracked: dict[str, _Tracked], num_requests: int, progress: bool) -> None:
        pending = {r for r, t in tracked.items() if not t.completion.finished}
        bar = None
        if progress:
            from tqdm import tqdm

            unfinished = len({id(t.out) for t in tracked.values() if not t.out.finished})
            bar = tqdm(total=num_requests, desc="generate", unit="req", initial=num_requests - unfinished)
        while pending:
            msg = self.engine.recv()
            if not isinstance(msg, RequestOutputs):
                continue
            for d in msg.deltas:
                t = tracked.get(d.req_id)
                if t is None or t.completion.finished:
                    continue  # an abort we asked for after a stop string
                if t.apply(d):
                    self.engine.send(AbortRequests([d.req_id]))
                if t.completion.finished:
                    pending.discard(d.req_id)
                    if bar and t.out.finished:
                        bar.update(1)
        if bar:
            bar.close()
