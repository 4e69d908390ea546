"""The one stop-string rule (stop_strings.py) and both engines applying it: the text ends where the
earliest stop string in it begins, however the text is cut into pieces."""

from __future__ import annotations

import asyncio
import math

from hypothesis import given
from hypothesis import strategies as st

from exo_worker.distributed import frames
from exo_worker.engine import RunOutcome
from exo_worker.sim_engine import SimEngine
from exo_worker.stop_strings import StopStringFilter
from protocol.ids import TaskId
from protocol.messages import AssignTask, FinishReason, TaskChunk, TaskFailed, TaskFinished, Usage
from tests.worker.runner_harness import INSTANCE, NODE, Recorder, close, ready_runner
from tests.worker.test_sim_engine import run, text_params


def _cut_at_earliest_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Reference: the text before the earliest occurrence of any stop string."""
    found = [text.index(stop) for stop in stops if stop and stop in text]
    return (text[: min(found)], True) if found else (text, False)


def _earliest_stop(text: str, stops: list[str]) -> str | None:
    """Reference: the stop string that ends the text (the earliest; the shortest of those there)."""
    found = [(text.index(stop), len(stop), stop) for stop in stops if stop and stop in text]
    return min(found)[2] if found else None


def _stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    out, hit, _ = _stream_matched(pieces, stops)
    return out, hit


def _stream_matched(pieces: list[str], stops: list[str]) -> tuple[str, bool, str | None]:
    stop_filter, out = StopStringFilter(stops), []
    for piece in pieces:
        text, hit = stop_filter.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True, stop_filter.matched
    assert stop_filter.matched is None  # nothing is named before the text ends at a stop
    tail, hit = stop_filter.flush()
    return "".join(out) + tail, hit, stop_filter.matched


_chunks = st.lists(st.text(alphabet="abc\n", max_size=5), max_size=12)
_stops = st.lists(st.text(alphabet="abc\n", min_size=1, max_size=4), max_size=3)


@given(_chunks, _stops)
def test_stop_filter_matches_reference_however_the_text_is_cut(pieces: list[str], stops: list[str]) -> None:
    out, hit, matched = _stream_matched(pieces, stops)
    assert (out, hit) == _cut_at_earliest_stop("".join(pieces), stops)
    assert not any(stop in out for stop in stops)
    assert matched == _earliest_stop("".join(pieces), stops)
    assert (matched is not None) == hit


def test_stop_filter_holds_back_a_possible_stop_prefix() -> None:
    stop_filter = StopStringFilter(["</s>"])
    assert stop_filter.feed("Hello <") == ("Hello ", False)  # "<" might start "</s>"
    assert stop_filter.feed("/") == ("", False)
    assert stop_filter.feed("s> world") == ("", True)
    stop_filter = StopStringFilter(["</s>"])
    assert stop_filter.feed("a <") == ("a ", False)
    assert stop_filter.feed("b") == ("<b", False)  # no longer a prefix of "</s>": released


def test_stop_filter_without_stops_passes_text_through() -> None:
    stop_filter = StopStringFilter(["", ""])
    assert stop_filter.feed("abc") == ("abc", False)
    assert stop_filter.flush() == ("", False)


def test_the_earliest_stop_wins_even_when_a_later_one_completes_first() -> None:
    stop_filter = StopStringFilter(["bc", "abcd"])
    assert stop_filter.feed("xabc") == ("x", False)  # "bc" is complete, but "abcd" would begin earlier
    assert stop_filter.feed("d and more") == ("", True)
    assert stop_filter.matched == "abcd"
    stop_filter = StopStringFilter(["bc", "abcd"])
    assert stop_filter.feed("xabc") == ("x", False)
    assert stop_filter.feed("e") == ("a", True)  # "abcd" cannot happen any more: cut at "bc"
    assert stop_filter.matched == "bc"


def test_of_stops_beginning_at_the_same_place_the_shortest_is_named() -> None:
    # Whether the longer one is complete in the same piece or never comes, the answer is the same.
    for pieces in (["xab", "cd"], ["xabcd"], ["xa", "b"]):
        stop_filter = StopStringFilter(["abcd", "ab"])
        hit = False
        for piece in pieces:
            _, hit = stop_filter.feed(piece)
            if hit:
                break
        assert hit and stop_filter.matched == "ab"


def test_a_stop_decided_only_at_the_end_of_the_stream_still_stops() -> None:
    stop_filter = StopStringFilter(["bc", "abcd"])
    assert stop_filter.feed("xabc") == ("x", False)
    assert stop_filter.flush() == ("a", True)
    assert stop_filter.matched == "bc"


def test_the_sim_engine_applies_the_same_rule() -> None:
    full, _ = run(SimEngine(math.inf), text_params(max_tokens=30, seed=3))
    text = "".join(full)
    # Two stops: the end of word i (completes first) and words i..i+1 (begins earlier, ends later).
    starts = [len("".join(full[:i])) for i in range(len(full))]
    i = next(
        i
        for i in range(1, len(full) - 1)
        if len(full[i]) > 3
        and text.find(full[i][2:]) == starts[i] + 2
        and text.find(full[i] + full[i + 1]) == starts[i]
    )
    stops = (full[i][2:], full[i] + full[i + 1])
    pieces, outcome = run(SimEngine(math.inf), text_params(max_tokens=30, seed=3, stop=stops))
    assert outcome.finish_reason is FinishReason.STOP
    assert "".join(pieces) == text[: starts[i]] == _cut_at_earliest_stop(text, list(stops))[0]
    assert outcome.stop_sequence == full[i] + full[i + 1]  # the stop that ended it, not the first done


def test_the_sim_engine_names_no_stop_when_none_ended_the_answer() -> None:
    pieces, outcome = run(SimEngine(math.inf), text_params(max_tokens=5, seed=3, stop=("\x00never",)))
    assert outcome.finish_reason is FinishReason.LENGTH and outcome.stop_sequence is None
    assert len("".join(pieces).split()) == 5


# ---- the matched stop string leaves the worker: the runner's TaskFinished, the rank-0 frame ----


async def _finals(stops: dict[str, tuple[str, ...]]) -> tuple[Recorder, list[TaskFinished | TaskFailed]]:
    """Run one SimEngine task per entry (task id: its stop strings) through a Runner."""
    rec = Recorder()
    runner = await ready_runner(SimEngine(math.inf), rec)
    for task_id, stop in stops.items():
        params = text_params(max_tokens=12, seed=5, stop=stop)
        runner.submit(AssignTask(task_id=TaskId(task_id), node_id=NODE, instance_id=INSTANCE, params=params))
    finals = [await rec.final_of(task_id) for task_id in stops]
    await close(runner)
    return rec, finals


def test_the_runner_reports_the_stop_string_that_ended_the_answer() -> None:
    full, _ = run(SimEngine(math.inf), text_params(max_tokens=12, seed=5))
    text = "".join(full)
    stop = next(word.strip() for word in full[2:] if text.find(word.strip()) > 0)
    rec, (hit, miss) = asyncio.run(_finals({"hit": ("never written", stop), "miss": ("never written",)}))
    assert isinstance(hit, TaskFinished) and isinstance(miss, TaskFinished)
    assert (hit.finish_reason, hit.stop_sequence) == (FinishReason.STOP, stop)
    chunks = [c.text for c in rec.of("hit", TaskChunk) if isinstance(c, TaskChunk)]
    assert "".join(chunks) == text[: text.find(stop)]
    assert (miss.finish_reason, miss.stop_sequence) == (FinishReason.LENGTH, None)


def test_the_rank0_done_frame_carries_the_whole_outcome() -> None:
    outcome = RunOutcome(FinishReason.STOP, Usage(prompt_tokens=3, completion_tokens=2), stop_sequence="###")
    body = frames.encode(frames.Done.of(7, outcome))[4:]  # past the length header
    done = frames.decode(frames.from_child, body)
    assert isinstance(done, frames.Done) and done.run == 7 and done.outcome() == outcome
