"""A real `mlaserve serve` process for end-to-end tests, and what they check about processes."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

ENGINE_ARGS = ["--dtype", "float32", "--kv-cache-memory", "40000000", "--block-size", "16",
               "--max-num-batched-tokens", "256"]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


class ServerProcess:
    """`mlaserve serve ARGV`, started and read until its log says `ready` (a regex; `match` holds
    it). A server that never says it is stopped here, so a failed start leaves no process behind."""

    def __init__(self, argv: list[str], ready: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "serve", *argv],
                                     stderr=subprocess.PIPE, text=True)
        # Log lines (a warning, say) may come before the one that says where it listens.
        lines, m = [], None
        while m is None and len(lines) < 50:
            line = self.proc.stderr.readline()
            if not line:  # exited
                break
            lines.append(line)
            m = re.search(ready, line)
        if m is None:
            self.stop()
            raise AssertionError(f"server did not start: {''.join(lines)}{self.proc.stderr.read()}")
        self.match = m
        self.children = children_of(self.proc.pid)
        # The log is read on from here, so that a server that logs much never blocks on a full pipe.
        self.log = lines
        self._reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def log_text(self) -> str:
        return "".join(self.log)

    metrics_url = ""  # set by each kind of server

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(self, name: str, predicate, timeout_s: float = 10.0, **labels) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.metric(name, **labels)
            if predicate(v) or time.monotonic() > deadline:
                return v
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


class RunningServer(ServerProcess):
    """The ZeroMQ endpoint with its metrics port."""

    def __init__(self, checkpoint, *extra: str):
        super().__init__(["--model", str(checkpoint), "--port", "0", "--metrics-port", "0", *ENGINE_ARGS, *extra],
                         r"on (tcp://\S+), metrics on (http://\S+)")
        self.address, self.metrics_url = self.match.group(1), self.match.group(2)


def left_running(pids: list[int], wait_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and not is_zombie(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
