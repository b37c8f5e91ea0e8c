"""mlaserve's engine: `from engine import LLM, SamplingParams`."""

from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM (a frontend, entrypoints/llm.py) pulls in ZMQ and the process plumbing; import it only
    # when asked for.
    if name == "LLM":
        from entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
