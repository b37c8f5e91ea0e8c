"""The engine's processes seen from a frontend: EngineClient starts the scheduler and worker
processes, sends them requests, receives their outputs and stops them all (at exit too)."""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import socket
import tempfile
import threading
import time

import zmq

from engine.config import EngineConfig
from engine.engine_core import run_engine_core
from engine.eplb import initial_placements
from engine.messages import EngineDead, EngineHeartbeat, EngineReady, SchedulerToFrontend, Shutdown
from engine.model_config import ModelConfig
from engine.processes import Channel, spawn
from engine.worker_process import run_worker


class EngineDeadError(RuntimeError):
    pass


def failure_summary(reason: str, log) -> str:
    """Logs an engine failure whole (a child's traceback, say) and returns the line a frontend
    tells its clients and its health check."""
    log.error("the engine failed; every request in flight fails with the reason:\n%s", reason)
    return reason.strip().splitlines()[-1] if reason.strip() else "the engine failed"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_fits_model(config: EngineConfig, cfg: ModelConfig) -> None:
    """Options that cannot work with this checkpoint fail here, before any process starts."""
    config.served_model_len(cfg.max_position_embeddings)
    if config.ep_size > 1 and not config.enable_eplb and cfg.n_routed_experts % config.ep_size:
        raise ValueError(f"ep_size {config.ep_size} does not divide the model's {cfg.n_routed_experts} routed experts")
    if config.enable_eplb:
        if (cfg.n_routed_experts + config.num_redundant_experts) % config.ep_size:
            raise ValueError(f"the model's {cfg.n_routed_experts} routed experts + num_redundant_experts "
                             f"{config.num_redundant_experts} do not split evenly over ep_size {config.ep_size}")
        initial_placements(config, cfg)  # (an unreadable eplb_load_file is refused here)
    if config.num_speculative_tokens and cfg.num_nextn_predict_layers < 1:
        raise ValueError(f"num_speculative_tokens={config.num_speculative_tokens} needs the checkpoint's MTP module, "
                         f"and {config.model_dir} has none (num_nextn_predict_layers is 0)")


class EngineClient:
    """Starts the scheduler and worker processes and talks to the scheduler; stops them all."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 600.0):
        # Shutdown may come from two threads at once (the offline API's loop seeing a failure, its
        # caller seeing the exception): one closes the sockets, the other waits for it.
        self._shutdown_lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="mlaserve-")
        if config.node_rank != 0:
            raise ValueError("the frontend and scheduler run on node 0; other nodes run `mlaserve worker`")
        addrs = {k: f"ipc://{self._dir}/{k}" for k in ("input", "output")}
        self._ctx = zmq.Context()
        self.outputs = Channel(self._ctx, zmq.PULL, addrs["output"], bind=True, decode_type=SchedulerToFrontend)
        self.model_cfg = model_cfg = ModelConfig.from_checkpoint(config.model_dir)
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
        self.check_running()
        self.inputs.send(msg)

    def check_running(self) -> None:
        if self.stopped is not None:
            raise EngineDeadError(f"the engine is stopped ({self.stopped}); start a new one")

    def recv(self, timeout_s: float | None = None):
        """The next message from the scheduler; raises EngineDeadError if a process died or the
        scheduler went silent (it beats every half second once ready)."""
        self.check_running()
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
        with self._shutdown_lock:
            self._shutdown(why)

    def _shutdown(self, why: str) -> None:
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
