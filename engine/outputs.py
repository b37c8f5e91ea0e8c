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
class CompletionOutput:
    """One of a request's n completions (SamplingParams.n)."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop", "abort", "error"
    logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's completions in `outputs`, by index; `text`, `token_ids`, `finish_reason` and
    `logprobs` are those of the first (the only one when n is 1)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=lambda: [CompletionOutput(0)])
    error: str | None = None  # why the request was refused, naming the field
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metrics: RequestMetrics | None = None  # first scheduled / first token of any completion, last finish

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprobs] | None:
        return self.outputs[0].logprobs

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.outputs)
