"""Engine-side timings: per-request timelines on the first output, per-step histograms in EngineStats."""
from __future__ import annotations

import msgspec
import pytest

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.engine_core import EngineCore
from lockgate.engine.core.fake_runner import FakeRunner
from lockgate.engine.frontend.output_processor import OutputProcessor
from lockgate.engine.loader import LoadedCheckpoint, load_checkpoint
from lockgate.engine.messages import CoreMessage, EngineCoreOutput, EngineCoreRequest, StepOutputs
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.step_stats import ITERATION_TOKENS_BUCKETS, STEP_SECONDS_BUCKETS, HistogramCounts


@pytest.fixture(scope="module")
def ckpt() -> LoadedCheckpoint:
    return load_checkpoint(None)


def _core(ckpt: LoadedCheckpoint, **options: object) -> EngineCore:
    return EngineCore(EngineConfig(load_format="fake", **options), ckpt)  # type: ignore[arg-type]


def test_histogram_counts_buckets_are_le_and_add_up() -> None:
    h = HistogramCounts.empty((1, 8, 16))
    for v in (1, 1.5, 8, 9, 100):
        h.observe(v, (1, 8, 16))
    assert h.counts == [1, 2, 1, 1] and h.count == 5 and h.sum == pytest.approx(119.5)
    assert h.cumulative((1, 8, 16)) == [(1.0, 1.0), (8.0, 3.0), (16.0, 4.0), (float("inf"), 5.0)]
    both = h.plus(h)
    assert both.counts == [2, 4, 2, 2] and both.sum == pytest.approx(239.0) and h.counts == [1, 2, 1, 1]
    assert HistogramCounts().plus(h).counts == h.counts and h.plus(None).counts == h.counts


def test_iteration_tokens_are_prompt_tokens_computed_plus_tokens_sampled(ckpt: LoadedCheckpoint) -> None:
    # A per-step prefill cap of 8 splits the 20-token prompt into chunks: every chunk counts when it runs.
    core = _core(ckpt, max_prefill_tokens=8, enable_prefix_caching=False)
    prompts = [list(range(3, 23)), [5, 6, 7], [9, 10, 11, 12]]
    max_tokens = [5, 3, 1]
    for i, (p, m) in enumerate(zip(prompts, max_tokens)):
        core.add_request(EngineCoreRequest(f"r{i}", p, SamplingParams(max_tokens=m), arrival_time=0.0))
    steps = 0
    while core.has_unfinished_requests():
        core.step()
        steps += 1
    it = core.stats().iteration_tokens
    assert it is not None and it.count == steps
    assert it.sum == sum(map(len, prompts)) + sum(max_tokens)
    st = core.stats().step_seconds
    assert st is not None and st.count == steps and st.sum > 0
    assert len(it.counts) == len(ITERATION_TOKENS_BUCKETS) + 1 and len(st.counts) == len(STEP_SECONDS_BUCKETS) + 1


def test_first_output_carries_queue_and_schedule_times(ckpt: LoadedCheckpoint) -> None:
    core = _core(ckpt, max_num_seqs=1)  # one at a time: the second request waits for the first
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    for i in range(2):
        core.add_request(EngineCoreRequest(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=3), arrival_time=0.0))
    proc = OutputProcessor(ckpt.tokenizer, clock_offset=100.0)
    for i in range(2):
        proc.add_request(f"r{i}", None, [1, 2, 3 + i], SamplingParams(max_tokens=3))
    outs: list[EngineCoreOutput] = []
    finals = {}
    while core.has_unfinished_requests():
        step = core.step()
        outs += step
        for o in proc.process(step, core.last_step_end)[0]:
            if o.finished:
                finals[o.request_id] = o
    firsts = {o.request_id: o for o in reversed(outs)}  # each request's first output
    for o in outs:
        assert (o.start_times is not None) == (o is firsts[o.request_id])
    q0, s0 = firsts["r0"].start_times  # type: ignore[misc]
    q1, s1 = firsts["r1"].start_times  # type: ignore[misc]
    assert q0 <= s0 and q1 <= s1
    assert s1 - q1 > s0 - q0  # r1 queued behind all of r0
    t0, t1 = finals["r0"].engine_times[0], finals["r1"].engine_times[0]
    assert t0.request_id == "r0" and t1.request_id == "r1" and t0.clock_offset == 100.0
    assert (t0.queued, t0.scheduled) == (q0, s0)
    assert t0.queued <= t0.scheduled <= t0.first_token < t0.last_token <= t1.scheduled < t1.first_token
    assert t1.queue_s == pytest.approx(s1 - q1) and t1.prefill_s > 0 and t1.decode_s > 0
    assert t1.inference_s == pytest.approx(t1.prefill_s + t1.decode_s)
    assert not core._queued_at and not core._started_at  # nothing kept after the requests end


def test_abort_before_scheduling_leaves_nothing(ckpt: LoadedCheckpoint) -> None:
    core = _core(ckpt)
    core.add_request(EngineCoreRequest("a", [1, 2, 3], SamplingParams(max_tokens=3), arrival_time=0.0))
    core.abort_requests(["a"])
    assert not core._queued_at and not core.has_unfinished_requests()


def test_timings_cross_the_wire() -> None:
    stats = HistogramCounts.empty(STEP_SECONDS_BUCKETS)
    stats.observe(0.02, STEP_SECONDS_BUCKETS)
    from lockgate.engine.messages import EngineStats

    msg = StepOutputs(outputs=[EngineCoreOutput("r", [7], start_times=(1.5, 2.5))],
                      stats=EngineStats(0, 0, 0, 0, 0, 0.0, 0, 0, 0, step_seconds=stats), timestamp=3.5)
    back = msgspec.msgpack.Decoder(CoreMessage).decode(msgspec.msgpack.encode(msg))
    assert isinstance(back, StepOutputs) and back.timestamp == 3.5
    assert back.outputs[0].start_times == (1.5, 2.5)
    assert back.stats.step_seconds == stats and back.stats.iteration_tokens is None
