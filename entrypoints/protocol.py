"""The serving protocol: msgspec structs, msgpack on the wire, one struct per ZeroMQ frame,
tagged by a "type" field. docs/protocol.md is the reference for client writers.

client -> server: Generate, Abort, Health, GetModelInfo
server -> client: Delta*, then Final (or Error) for a Generate; HealthReply; ModelInfo; Error
"""

from __future__ import annotations

from typing import Annotated

import msgspec

# Bounds a frame's fields are read against (their lengths come before their elements, so an
# overlong field is refused without reading it): a request id is echoed in every message back.
MAX_REQUEST_ID_CHARS = 256
MAX_PROMPT_TOKEN_IDS = 1 << 20  # DeepSeek-V3's context is 163840; the engine refuses past its own
RequestId = Annotated[str, msgspec.Meta(max_length=MAX_REQUEST_ID_CHARS)]

# 2: generate.priority, final.prompt_logprobs; 3: health_reply.detail and status "engine_dead",
# error codes "limit_exceeded" and "internal_error", a chosen ZeroMQ routing id is taken as the
# connection it arrives on
PROTOCOL_VERSION = 3


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, omit_defaults=True):
    pass


# ---- client -> server -------------------------------------------------------------------------

class Generate(_Msg, tag="generate"):
    request_id: RequestId
    prompt: str | None = None
    prompt_token_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_PROMPT_TOKEN_IDS)] | None = None
    # A map of SamplingParams fields (unknown names are an error), kept as its bytes while the frame
    # is read: the server decodes it off its loop, against SamplingParams' own typed schema.
    params: msgspec.Raw = msgspec.Raw(b"\x80")
    stream: bool = True
    priority: int = 0  # lower runs sooner, on a server started with --scheduling-policy priority


class Abort(_Msg, tag="abort"):
    request_id: RequestId


class Health(_Msg, tag="health"):
    pass


class GetModelInfo(_Msg, tag="get_model_info"):
    pass


ClientMessage = Generate | Abort | Health | GetModelInfo


# ---- server -> client -------------------------------------------------------------------------

class TokenLogprob(msgspec.Struct, omit_defaults=True):
    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int] = []
    top_logprobs: list[float] = []


class Delta(_Msg, tag="delta"):
    request_id: str
    text: str = ""  # new text since the previous Delta of this completion
    token_ids: list[int] = []  # new token ids since the previous Delta of this completion
    logprobs: list[TokenLogprob] = []
    index: int = 0  # which of the request's n completions


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


class Timing(msgspec.Struct):
    queue_s: float  # arrival to first scheduled
    time_to_first_token_s: float
    e2e_s: float


class Completion(msgspec.Struct, omit_defaults=True):
    index: int
    finish_reason: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = []


class Final(_Msg, tag="final"):
    """Sent once every completion has ended. The top-level fields are the first completion's;
    with n > 1, `completions` holds all n by index."""
    request_id: str
    finish_reason: str  # "length" | "stop" | "abort"
    text: str  # the whole completion
    token_ids: list[int]  # the whole completion
    usage: Usage  # completion_tokens: over all completions
    timing: Timing
    logprobs: list[TokenLogprob] = []  # all of them, when not streaming and asked for
    completions: list[Completion] = []
    # One per prompt token when asked for (params.prompt_logprobs), streaming or not; the first is
    # None (nothing predicts it).
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Error(_Msg, tag="error"):
    code: str  # see ERROR_CODES
    message: str  # a sentence for people
    request_id: str | None = None  # None when the message could not be read far enough


class HealthReply(_Msg, tag="health_reply"):
    status: str  # "ok" | "shutting_down" | "engine_dead"
    running: int
    waiting: int
    detail: str = ""  # with "engine_dead": why (the stuck rank, the failed process)
    stats_age_s: float = 0.0  # how old running/waiting are (the engine answers between steps)


class ModelInfo(_Msg, tag="model_info"):
    model: str
    protocol_version: int
    max_model_len: int
    vocab_size: int
    block_size: int
    kv_cache_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    dtype: str


ServerMessage = Delta | Final | Error | HealthReply | ModelInfo

ERROR_CODES = {
    "bad_message": "the frame is not msgpack, not a known message type, or has wrong or unknown fields",
    "invalid_request": "the request's prompt or parameters are not acceptable (the message says which)",
    "duplicate_request_id": "this client already has an unfinished request with that id",
    "unknown_request": "Abort named a request id this client has no unfinished request with",
    "shutting_down": "the server is stopping and takes no new requests",
    "engine_error": "the engine failed (the message says why); the server answers health until it is restarted",
    "limit_exceeded": "this connection holds as much as one connection may (the message names the limit)",
    "internal_error": "the server could not handle this message; it keeps serving the others",
}

client_encoder = msgspec.msgpack.Encoder()
client_decoder = msgspec.msgpack.Decoder(ServerMessage)
server_decoder = msgspec.msgpack.Decoder(ClientMessage)
server_encoder = msgspec.msgpack.Encoder()
