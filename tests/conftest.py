import os
import signal
import time

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before
# torch (which imports triton) is imported.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from model.checkpoint_maker import make_checkpoint

    return make_checkpoint("tiny", seed=0, out_dir=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """A real `mlaserve serve` on the tiny checkpoint, one per test module, stopped cleanly at its end."""
    from tests.server_util import RunningServer, left_running

    s = RunningServer(tiny_checkpoint)
    yield s
    assert s.stop() == 0
    assert not left_running(s.children), "engine processes left running"


# Every process a test starts (engines, workers, servers, and anything they start) inherits this
# mark, so a test module that leaves one running fails at its end, orphans included: a process
# whose parent died is no longer this session's descendant, but it still carries the mark.
SESSION_MARK = "MLASERVE_TEST_SESSION"
os.environ[SESSION_MARK] = str(os.getpid())
_NOT_OURS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")  # Python's own helpers


def marked_processes() -> dict[int, str]:
    """pid -> command line of the live processes that carry this session's mark, but for pytest."""
    mark = f"{SESSION_MARK}={os.getpid()}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, not yet reaped
        except OSError:
            continue
        if not any(name in cmdline for name in _NOT_OURS):
            found[int(entry)] = cmdline
    return found


@pytest.fixture(scope="module", autouse=True)
def no_process_outlives_its_module():
    yield
    deadline = time.monotonic() + 30  # shutdowns join their processes; this is only a margin
    left = marked_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = marked_processes()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)  # so that one leak does not pile onto the next module
        except ProcessLookupError:
            pass
    assert not left, f"processes left running by this module: {left}"


def pytest_terminal_summary(terminalreporter):
    """Which compiled CPU kernel variants this run tested, family by family (tests/cpu_variants.py)."""
    from tests.cpu_variants import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("CPU kernel variants")
        for line in lines:
            terminalreporter.write_line(line)
