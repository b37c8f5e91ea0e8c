"""mlaserve's engine: `from engine import LLM, SamplingParams, StructuredOutputsParams`."""

import importlib.util
from pathlib import Path


def _check_kernels_is_ours() -> None:
    # Hugging Face's `kernels` distribution has the same import name as mlaserve's `kernels/`
    # package. Installed beside it (transformers >= 5.25 requires it), it shadows ours, and
    # without this check the first symptom is a baffling "No module named 'kernels.backend'".
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parent.parent / "kernels"
    found = Path(spec.origin).resolve().parent if spec is not None and spec.origin else None
    if found != ours:
        raise ImportError(
            f"the module `kernels` resolves to {found or 'nothing'}, not mlaserve's {ours}: "
            "another distribution named `kernels` (Hugging Face's, which transformers >= 5.25 "
            "requires) is installed in this environment; `pip uninstall kernels` and keep "
            "transformers < 5.25 as pyproject.toml pins it"
        )


_check_kernels_is_ours()

from engine.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams"]


def __getattr__(name: str):
    # LLM (a frontend, entrypoints/llm.py) pulls in ZMQ and the process plumbing; import it only
    # when asked for.
    if name == "LLM":
        from entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
