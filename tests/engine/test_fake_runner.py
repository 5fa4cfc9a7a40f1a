"""load_format="fake": the real engine (scheduler, KV accounting, output processing) with no model."""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from lockgate.engine.config import EngineConfig
from lockgate.engine.core import engine_core
from lockgate.engine.core.engine_core import EngineCore
from lockgate.engine.core.fake_runner import FakeRunner
from lockgate.engine.llm import LLM
from lockgate.engine.loader import LoadedCheckpoint, load_checkpoint
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams
from tests.server.conftest import start_server

PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"]


@pytest.fixture(scope="module")
def ckpt() -> LoadedCheckpoint:
    return load_checkpoint(None)  # the default model's config and tokenizer; weights stay lazy


@pytest.fixture(scope="module")
def llm(ckpt: LoadedCheckpoint) -> Iterator[LLM]:
    with pytest.MonkeyPatch.context() as mp:  # reuse the parsed checkpoint instead of reading it again
        mp.setattr(engine_core, "load_checkpoint", lambda *a, **k: ckpt)
        yield LLM(load_format="fake")


def test_config_validation() -> None:
    assert EngineConfig(load_format="fake", fake_step_delay_s=0.5).fake_step_delay_s == 0.5
    for bad in (-0.1, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="fake_step_delay_s"):
            EngineConfig(load_format="fake", fake_step_delay_s=bad)  # type: ignore[arg-type]
    assert EngineConfig(load_format="fake", fake_token_delay_s=1e-4).fake_token_delay_s == 1e-4
    for bad in (-0.1, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="fake_token_delay_s"):
            EngineConfig(load_format="fake", fake_token_delay_s=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'fake'"):
        EngineConfig(load_format="fakes")


def test_uses_fake_runner_and_no_weights(llm: LLM) -> None:
    core = llm.engine.core
    assert isinstance(core.runner, FakeRunner)
    assert not hasattr(core.runner, "model") and not hasattr(core.runner, "kv_caches")
    assert core.runner.num_blocks > 0 and core.kv.num_blocks == core.runner.num_blocks
    assert core.max_model_len == 8192  # the real model's limits


def test_exactly_max_tokens_and_never_special(llm: LLM) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=64))
    tok = llm.tokenizer
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 64 and c.finish_reason == "length"
        assert not any(tok.is_special(t) for t in c.token_ids)
        assert c.text.strip()  # plain text, not empty
    assert len({o.outputs[0].text for o in outs}) == len(PROMPTS)  # depends on the prompt


def test_deterministic_across_runs(llm: LLM) -> None:
    a = llm.generate(PROMPTS, SamplingParams(max_tokens=16))
    b = llm.generate(list(reversed(PROMPTS)), SamplingParams(max_tokens=16))
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in reversed(b)]
    # The seed is part of the derivation: another seed, another text; the same seed, the same text.
    s1 = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, seed=7, temperature=1.0))[0].outputs[0]
    s2 = llm.generate(PROMPTS[0], SamplingParams(max_tokens=16, seed=7, temperature=1.0))[0].outputs[0]
    assert s1.token_ids == s2.token_ids != a[0].outputs[0].token_ids


def test_n_greater_than_one(llm: LLM) -> None:
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, n=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    seeded = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, n=3, seed=1, temperature=1.0))[0]
    assert len({tuple(c.token_ids) for c in seeded.outputs}) == 3  # children get seed, seed+1, seed+2


def test_stop_strings(llm: LLM) -> None:
    full = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40))[0].outputs[0]
    stop = llm.tokenizer.decode(full.token_ids[20:22]).strip()
    cut = full.text.find(stop)
    assert stop and cut > 0
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=40, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:cut]
    assert len(out.token_ids) < 40


def test_logprobs_shape_and_values(llm: LLM) -> None:
    c = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, logprobs=3))[0].outputs[0]
    assert c.logprobs is not None and len(c.logprobs) == 8
    for tok, lp in zip(c.token_ids, c.logprobs):
        assert len(lp) == 3 and tok in lp
        values = [v.logprob for v in lp.values()]
        assert values[0] == lp[tok].logprob == max(values)  # the sampled token is the top-1
        assert all(v < 0 for v in values) and sum(math.exp(v) for v in values) <= 1.0
        assert values == sorted(values, reverse=True)
    c0 = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, logprobs=0))[0].outputs[0]
    assert c0.logprobs is not None and all(len(lp) == 1 for lp in c0.logprobs)
    assert c0.token_ids == c.token_ids[:4]


def _core(ckpt: LoadedCheckpoint, **options: object) -> EngineCore:
    return EngineCore(EngineConfig(load_format="fake", **options), ckpt)  # type: ignore[arg-type]


def _run(core: EngineCore) -> int:
    steps = 0
    while core.has_unfinished_requests():
        core.step()
        steps += 1
    return steps


def test_step_delay_once_per_step_on_a_fake_clock(ckpt: LoadedCheckpoint) -> None:
    core = _core(ckpt, fake_step_delay_s=0.25)
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    slept: list[float] = []
    runner.sleep = slept.append  # a fake clock: record, don't wait
    for i in range(5):
        core.add_request(EngineCoreRequest(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=6), arrival_time=0.0))
    steps = _run(core)
    # All five prefill together in step 1 (which samples token 1), then 5 batched decode steps.
    assert steps == 6 and runner.num_steps == 6
    assert slept == [0.25] * 6 and runner.total_delay_s == pytest.approx(1.5)


def test_step_delay_scales_with_steps_not_requests(ckpt: LoadedCheckpoint) -> None:
    # max_num_seqs=2: six requests run three waves of two, so three times the steps of one wave.
    core = _core(ckpt, fake_step_delay_s=0.1, max_num_seqs=2)
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    runner.sleep = lambda s: None
    for i in range(6):
        core.add_request(EngineCoreRequest(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=4), arrival_time=0.0))
    assert _run(core) == 12 and runner.total_delay_s == pytest.approx(1.2)


def test_token_delay_makes_step_time_grow_with_tokens(ckpt: LoadedCheckpoint) -> None:
    core = _core(ckpt, fake_step_delay_s=0.01, fake_token_delay_s=0.001, max_prefill_tokens=64)
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    slept: list[float] = []
    runner.sleep = slept.append
    core.add_request(EngineCoreRequest("short", [1, 2, 3], SamplingParams(max_tokens=3), arrival_time=0.0))
    core.add_request(EngineCoreRequest("long", list(range(10, 110)), SamplingParams(max_tokens=2), arrival_time=0.0))
    _run(core)
    # Step 1: short's 3 prompt tokens + 61 of long's (the 64-token prefill cap); step 2: short's
    # decode + long's last 39; step 3: both decode (and finish). One sleep each.
    assert slept == pytest.approx([0.01 + 0.064, 0.01 + 0.040, 0.01 + 0.002])
    assert runner.total_delay_s == pytest.approx(sum(slept))


def test_zero_delay_never_sleeps_and_chunked_prefill_samples_once(ckpt: LoadedCheckpoint) -> None:
    core = _core(ckpt, max_num_batched_tokens=32)
    runner = core.runner
    assert isinstance(runner, FakeRunner)
    runner.sleep = lambda s: pytest.fail("slept with fake_step_delay_s=0")
    core.add_request(EngineCoreRequest("long", list(range(10, 110)), SamplingParams(max_tokens=3), arrival_time=0.0))
    outs = []
    while core.has_unfinished_requests():
        outs.extend(core.step())
    # 100 prompt tokens in chunks of 32: four steps, the last samples; then two decodes.
    assert runner.num_steps == 6
    assert [o.new_token_ids for o in outs if o.new_token_ids] and sum(len(o.new_token_ids) for o in outs) == 3


def test_server_with_fake_engine(tmp_path: Path, llm: LLM) -> None:
    srv = start_server(tmp_path, "--load-format", "fake", "--fake-step-delay", "0.001")
    try:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=9)
        assert r.usage is not None and r.usage.completion_tokens == 9
        assert r.choices[0].finish_reason == "length"
        # Same derivation in another process: the server's text equals the offline engine's.
        assert r.choices[0].text == llm.generate(PROMPTS[1], SamplingParams(max_tokens=9))[0].outputs[0].text
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=5, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == \
            llm.generate(PROMPTS[0], SamplingParams(max_tokens=5))[0].outputs[0].text
    finally:
        srv.stop()
