"""What the offline API returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.messages import TokenLogprobs


@dataclass
class RequestMetrics:
    arrival_time: float
    scheduled_time: float = 0.0
    first_token_time: float = 0.0
    finish_time: float = 0.0
    num_cached_tokens: int = 0

    @property
    def time_to_first_token(self) -> float:
        return self.first_token_time - self.arrival_time if self.first_token_time else 0.0

    @property
    def e2e_latency(self) -> float:
        return self.finish_time - self.arrival_time if self.finish_time else 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop", "abort", "error"
    error: str | None = None  # why the request was refused, naming the field
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
