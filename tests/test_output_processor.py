"""The frontends' request tracking (entrypoints/output_processor.py), without an engine."""

from __future__ import annotations

from engine.messages import RequestDelta
from engine.sampling_params import SamplingParams
from entrypoints.output_processor import OutputProcessor
from model.tokenizer_maker import build_tokenizer


def _ids(text: str) -> list[int]:
    return build_tokenizer().encode(text, add_special_tokens=False).ids


def test_a_fold_read_after_later_folds_still_says_what_it_was():
    """An asynchronous consumer reads folds from a queue after later ones were made: what a fold
    says of finishing must be as of that fold, or the consumer stops before the last one."""
    tracker = OutputProcessor(build_tokenizer())
    out, add = tracker.add("r", "p", _ids("p"), SamplingParams(n=2, max_tokens=2))
    assert add.req_id == "r" and add.params.n == 2
    folds = [tracker.process(RequestDelta("r/0", _ids("a"))),
             tracker.process(RequestDelta("r/0", _ids("b"), finished=True, finish_reason="length")),
             tracker.process(RequestDelta("r/1", _ids("cd"), finished=True, finish_reason="length"))]
    assert [(f.finished, f.request_finished) for f in folds] == [(False, False), (True, False), (True, True)]
    assert [f.new_text for f in folds] == ["a", "b", "cd"]
    assert out.finished and [c.text for c in out.outputs] == ["ab", "cd"]
    assert tracker.process(RequestDelta("r/0", _ids("x"))) is None  # no longer tracked
    assert len(tracker) == 0


def test_a_stop_string_ends_the_completion_and_forget_names_what_still_runs():
    tracker = OutputProcessor(build_tokenizer())
    tracker.add("q", None, _ids("p"), SamplingParams(n=2, stop=["STOP"]))
    fold = tracker.process(RequestDelta("q/0", _ids("go STOP here")))
    assert fold.stopped and fold.finish_reason == "stop" and fold.completion.text == "go "
    assert tracker.unfinished_ids("q") == ["q/1"]
    assert tracker.forget("q") == ["q/1"] and len(tracker) == 0
