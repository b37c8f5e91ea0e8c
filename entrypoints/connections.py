"""Who the server's clients are: ZeroMQ connections, what each holds, and when one goes.

A ROUTER names a peer by its routing id, which a client may choose, so a routing id alone does
not say which connection a request came from: a second client that takes a departed client's
id would be handed that client's pending output. The server therefore ties every client to the
TCP connection (its file descriptor, `zmq.SRCFD` of each frame) that its frames arrive on, and
watches the socket's monitor for disconnections:

- a disconnection ends every request of the identities that spoke on that connection, streaming
  or not, at once (their output has nowhere to go);
- a frame whose identity spoke on another connection before means that connection is gone (a
  ROUTER ignores a second live peer with an id in use): the old requests end first.

Output is only ever routed after the monitor's news has been read (`gone()` runs before every
batch of sends), so a client cannot take over an id between a disconnection and its output.

Limits per connection bound what one client may hold at once (unfinished completions, prompt
tokens queued): past them a request is refused with `limit_exceeded`, so that one client cannot
take every slot of the engine from the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

MAX_FRAME_BYTES = 16 << 20  # a bigger frame is refused before decoding
# A peer that answers no ZMTP ping for this long (a host gone, a cable pulled: no FIN ever comes)
# is disconnected by ZeroMQ, and its requests end as any departed client's do.
PEER_HEARTBEAT_IVL_MS, PEER_HEARTBEAT_TIMEOUT_MS = 5_000, 15_000


def open_router(ctx: zmq.Context, host: str, port: int) -> tuple[zmq.Socket, int]:
    """The server's ROUTER, bound to host:port (port 0: a free one), and the port it took."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone client raises: we abort its work
    router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    router.setsockopt(zmq.HEARTBEAT_IVL, PEER_HEARTBEAT_IVL_MS)
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, PEER_HEARTBEAT_TIMEOUT_MS)
    if port == 0:
        return router, router.bind_to_random_port(f"tcp://{host}")
    router.bind(f"tcp://{host}:{port}")
    return router, port


@dataclass(frozen=True)
class ClientLimits:
    max_completions: int  # unfinished completions (a request of n counts n), queued or running
    max_prompt_tokens: int  # prompt tokens of unfinished requests

    def refusal(self, held_completions: int, held_tokens: int, n: int, prompt_tokens: int) -> str | None:
        if held_completions + n > self.max_completions:
            return (f"this connection would hold {held_completions + n} unfinished completions; one connection "
                    f"may hold {self.max_completions} (the server's --max-completions-per-client)")
        if held_tokens + prompt_tokens > self.max_prompt_tokens:
            return (f"this connection would have {held_tokens + prompt_tokens} prompt tokens unfinished; one "
                    f"connection may have {self.max_prompt_tokens} (the server's --max-prompt-tokens-per-client)")
        return None


@dataclass
class ClientState:
    identity: bytes
    fd: int
    requests: dict[str, object] = field(default_factory=dict)  # request id -> the server's record
    completions: int = 0  # unfinished, counted against ClientLimits
    prompt_tokens: int = 0


class Connections:
    def __init__(self, router: zmq.Socket):
        self.monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.clients: dict[bytes, ClientState] = {}
        self._on_fd: dict[int, set[bytes]] = {}

    def client(self, identity: bytes, fd: int) -> tuple[ClientState, ClientState | None]:
        """The client of a frame, and the earlier client with that identity if it spoke on a
        connection that is gone (its requests are the caller's to end)."""
        c = self.clients.get(identity)
        if c is not None and c.fd == fd:
            return c, None
        old = self._forget(identity) if c is not None else None
        c = self.clients[identity] = ClientState(identity, fd)
        self._on_fd.setdefault(fd, set()).add(identity)
        return c, old

    def gone(self) -> list[ClientState]:
        """Clients whose connection closed since the last call (forgotten here)."""
        out = []
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for identity in self._on_fd.pop(event["value"], set()):
                    if (c := self.clients.pop(identity, None)) is not None:
                        out.append(c)
        return out

    def release_if_idle(self, c: ClientState) -> None:
        """A client without requests is forgotten; its next frame makes it anew."""
        if not c.requests and self.clients.get(c.identity) is c:
            self._forget(c.identity)

    def _forget(self, identity: bytes) -> ClientState | None:
        c = self.clients.pop(identity, None)
        if c is not None:
            ids = self._on_fd.get(c.fd)
            if ids is not None:
                ids.discard(identity)
                if not ids:
                    del self._on_fd[c.fd]
        return c

    def close(self) -> None:
        self.monitor.close(linger=0)
