"""The offline API: answers, sampling, stops, n, bad input, accounting.

What needs a model that knows things (an answer, a natural end of turn, readable text to cut with a
stop string) runs on the embedded default model; the engine's mechanics (seeds, top-k, stop ids,
n, logprobs, the prefix cache, bad input, aborts) run on a tiny random-weight Llama 3.1
(tests/engine/tiny_models.py), where a step costs next to nothing.
"""
from __future__ import annotations

import pytest

from lockgate import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    from tests.engine.tiny_models import make_checkpoint

    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint(path, "llama3.1")
    return LLM(str(path), dtype="float32")


def assert_idle(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0
    assert s.num_free_blocks == s.num_total_blocks, "blocks leaked"
    assert not llm.engine.has_unfinished_requests()


def test_default_model_knows_the_capital_of_japan(llm):
    # Not France: that greedy answer is a near-tie in the model itself ("The" leads "L" by 0.08 nats in
    # float32), which the default precision (int4, int8 activations as llama.cpp's) flips to "L'Étoile".
    out = llm.chat([{"role": "user", "content": "What is the capital of Japan?"}],
                   SamplingParams(temperature=0.0, max_tokens=32))
    assert "Tokyo" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"  # ended on <|im_end|>, not the length cap
    assert_idle(llm)


def test_default_model_runs_its_stored_int4_blocks_on_the_fused_path(llm):
    """The default settings: the Q4_1 GGUF on its own blocks, every step (prefill and decodes) in the
    fused native call, on whatever CPU runs this test (its float dtype "auto" included)."""
    runner = llm.engine.core.runner
    assert runner.quantization == "int4" and runner.kernels == "native"
    assert runner.native is not None, runner.path
    real, taken = runner.native_step, []

    def spy(batch):
        out = real(batch)
        taken.append(out is not None)
        return out

    runner.native_step = spy
    try:
        llm.generate(["The capital of France is", "1, 2, 3,"], SamplingParams(temperature=0.0, max_tokens=4))
    finally:
        runner.native_step = real
    assert len(taken) >= 4 and all(taken), taken
    assert_idle(llm)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny):
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
    alone = tiny.generate("Tell me a story about", p)[0].outputs[0].token_ids
    mixed = tiny.generate(["Tell me a story about", "Unrelated prompt", "Another one here"],
                         [p, SamplingParams(temperature=1.0, max_tokens=8), SamplingParams(max_tokens=20)])
    assert mixed[0].outputs[0].token_ids == alone
    other = tiny.generate("Tell me a story about", SamplingParams(temperature=1.0, max_tokens=16, seed=99,
                                                                 ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_top_k_1_equals_greedy(tiny):
    prompts = ["The first three planets are", "def fibonacci(n):"]
    greedy = tiny.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    topk1 = tiny.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


def test_stop_string_across_token_boundaries(llm):
    # 16 tokens of greedy text are plenty to cut a stop string from (the stopped runs end early).
    p = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = llm.generate("Count: 1, 2, 3, 4, 5,", p)[0].outputs[0]
    text = full.text
    # A stop string that spans tokens: take a slice of the greedy text across a boundary.
    assert len(text) > 12
    stop = text[5:11]
    out = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                               stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert stop not in out.text
    kept = llm.generate("Count: 1, 2, 3, 4, 5,", SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))
    assert kept[0].outputs[0].text == text[: text.index(stop) + len(stop)]
    assert_idle(llm)


def test_stop_token_ids_and_length(tiny):
    greedy = tiny.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    ids = greedy.outputs[0].token_ids
    assert greedy.outputs[0].finish_reason == "length" and len(ids) == 10
    out = tiny.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                                                    stop_token_ids=[ids[3]]))[0].outputs[0]
    first = ids.index(ids[3])
    assert out.token_ids == ids[: first + 1] and out.finish_reason == "stop" and out.stop_reason == ids[3]


def test_min_tokens_suppresses_eos(llm):
    msgs = [{"role": "user", "content": "Say hi."}]
    short = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=60))[0].outputs[0]
    assert short.finish_reason == "stop" and short.token_ids[-1] == llm.tokenizer.eos_token_id
    n = len(short.token_ids)
    longer = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=n + 8, min_tokens=n + 4))[0].outputs[0]
    assert len(longer.token_ids) >= n + 4
    assert llm.tokenizer.eos_token_id not in longer.token_ids[: n + 4]


def test_n_samples_share_the_prompt_blocks(tiny):
    prompt = "Here is a long shared prompt that spans several KV blocks. " * 6
    before = tiny.engine.stats().prefix_cache_hits
    out = tiny.generate(prompt, SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) > 0 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # distinct samples
    prompt_len = len(out.prompt_token_ids)
    # Children 1..3 found the first child's full prompt blocks in the cache.
    hits = tiny.engine.stats().prefix_cache_hits - before
    assert hits >= 3 * ((prompt_len - 1) // 16) * 16
    assert_idle(tiny)


def test_logprobs(tiny):
    out = tiny.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=4, logprobs=5))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids)
    for tok, entry in zip(comp.token_ids, comp.logprobs):
        assert tok in entry and len(entry) >= 5
        assert entry[tok].logprob == max(lp.logprob for lp in entry.values())  # greedy picks the top
        assert all(lp.logprob <= 0 for lp in entry.values())


def test_prefix_cache_hits_are_counted(tiny):
    prompt = "A long enough system prompt to fill a few blocks of sixteen tokens each. " * 4
    tiny.generate(prompt, SamplingParams(max_tokens=2))
    before = tiny.engine.stats()
    tiny.generate(prompt, SamplingParams(max_tokens=2))
    after = tiny.engine.stats()
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 48
    assert after.prefix_cache_queries > before.prefix_cache_queries


BAD = [
    ("", SamplingParams(), "prompt"),
    ([[]], SamplingParams(), "prompt"),
    ([1, 2, 10**9], SamplingParams(), "vocabulary"),
    ([1, -5], SamplingParams(), "vocabulary"),
    ("hi", SamplingParams(max_tokens=10**6), "max_tokens"),
]


@pytest.mark.parametrize("prompt,params,needle", BAD)
def test_bad_prompts_raise_and_leave_the_engine_clean(tiny, prompt, params, needle):
    with pytest.raises(ValueError, match=needle):
        tiny.generate(prompt, params)
    assert_idle(tiny)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n must be >= 1"),
    (dict(logprobs=21), "logprobs must be <= 20"),
    (dict(stop=5), "stop"),
    (dict(stop=["ok", 3]), "stop"),
])
def test_bad_sampling_params_name_the_field_and_limit(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_a_bad_request_in_a_batch_does_not_disturb_the_others(tiny):
    good = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = tiny.generate("The sky is", good)[0].outputs[0].token_ids
    with pytest.raises(ValueError):
        tiny.generate(["The sky is", ""], good)  # all or nothing: nothing queued
    assert_idle(tiny)
    tiny.engine.add_request("running", "The sky is", good)
    with pytest.raises(ValueError, match="vocabulary"):
        tiny.engine.add_request("bad", [10**9], good)
    done = []
    while tiny.engine.has_unfinished_requests():
        done += [o for o in tiny.engine.step() if o.finished]
    assert [o.request_id for o in done] == ["running"]
    assert done[0].outputs[0].token_ids == expected
    assert_idle(tiny)


def test_abort_frees_everything_at_once(tiny):
    p = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i in range(4):
        tiny.engine.add_request(f"abort-{i}", f"Request number {i} is about", p)
    tiny.engine.step()
    tiny.engine.step()
    assert tiny.engine.stats().num_running == 4
    for i in range(4):
        tiny.engine.abort_request(f"abort-{i}")
    assert_idle(tiny)


def test_stop_token_text_is_hidden_unless_asked_for(llm):
    base = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = llm.generate("The sky is", base)[0].outputs[0]
    stop_id = full.token_ids[4]
    first = full.token_ids.index(stop_id)
    stopped = llm.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                        stop_token_ids=[stop_id]))[0].outputs[0]
    assert stopped.token_ids == full.token_ids[: first + 1]
    assert stopped.text == llm.tokenizer.decode(full.token_ids[:first])
    shown = llm.generate("The sky is", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                      stop_token_ids=[stop_id], include_stop_str_in_output=True))
    assert shown[0].outputs[0].text == llm.tokenizer.decode(full.token_ids[: first + 1])


def test_sliding_window_caps_the_context(tmp_path):
    from tests.engine.tiny_models import make_checkpoint

    make_checkpoint(tmp_path, "mistral")
    cfg = (tmp_path / "config.json").read_text().replace('"sliding_window": 4096', '"sliding_window": 64')
    (tmp_path / "config.json").write_text(cfg)
    small = LLM(str(tmp_path), dtype="float32")
    assert small.engine.max_model_len == 64
    with pytest.raises(ValueError, match="maximum context length is 64"):
        small.generate([1] * 60, SamplingParams(max_tokens=5))
