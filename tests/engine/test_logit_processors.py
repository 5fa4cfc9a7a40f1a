"""logit_bias, allowed_token_ids and bad words: in the sampler (every path through it, the greedy
fast path included), through the engine on the PyTorch and the native quantized paths, and
their bounds (ValueErrors that name the field, in SamplingParams, the frontend and the core)."""
from __future__ import annotations

import pytest
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.core.sampler import Sampler, SamplingBatch
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.native import build
from lockgate.engine.sampling_params import MAX_LOGIT_BIAS
from tests.engine.tiny_models import make_checkpoint

V = 32
CPU = torch.device("cpu")


def run(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]] | None = None):
    outputs = outputs if outputs is not None else [[] for _ in params]
    batch = SamplingBatch.build(params, [[] for _ in params], outputs, [None] * len(params), V, CPU, [V - 1])
    return Sampler()(logits, batch)


def logits_for(b: int) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(b)) * 3


# ---- the sampler ---------------------------------------------------------------------------


def test_bias_reaches_greedy_rows_and_logprobs_stay_the_models():
    x = logits_for(3)
    top = x.argmax(-1)
    params = [SamplingParams(temperature=0.0, logit_bias={5: 100.0}),  # forces 5
              SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0}, logprobs=2),  # bans the argmax
              SamplingParams(temperature=0.0)]  # untouched, in the same batch
    out = run(x.clone(), params)
    assert out.token_ids[0] == 5
    second = x[1].clone()
    second[top[1]] = float("-inf")
    assert out.token_ids[1] == second.argmax() and out.token_ids[2] == top[2]
    # Logprobs are the model's own (before any processor), as vLLM reports them.
    raw = torch.log_softmax(x[1], -1)
    assert torch.allclose(out.logprobs[1], raw[out.token_ids[1]])


def test_an_all_greedy_batch_with_a_bias_leaves_the_fast_path():
    x = logits_for(2)
    plain = run(x.clone(), [SamplingParams(temperature=0.0)] * 2).token_ids
    forced = run(x.clone(), [SamplingParams(temperature=0.0, logit_bias={7: 100.0})] * 2).token_ids
    assert forced.tolist() == [7, 7] and plain.tolist() != [7, 7]


def test_allowed_token_ids_restrict_sampling():
    x = logits_for(64)
    allowed = [3, 9, 20]
    params = [SamplingParams(temperature=1.5, seed=i, allowed_token_ids=allowed) for i in range(63)]
    params.append(SamplingParams(temperature=0.0, allowed_token_ids=[11]))
    gens = [torch.Generator().manual_seed(i) for i in range(63)] + [None]
    batch = SamplingBatch.build(params, [[]] * 64, [[]] * 64, gens, V, CPU, [V - 1])
    tokens = Sampler()(x, batch).token_ids.tolist()
    assert set(tokens[:63]) <= set(allowed) and len(set(tokens[:63])) > 1 and tokens[63] == 11


def test_bad_words_single_token_always_multi_token_after_its_prefix():
    x = torch.zeros(4, V)
    x[:, 6] = 10.0  # everyone's favourite
    x[:, 4] = 5.0
    x[3, 8] = 20.0  # row 3 prefers 8
    p = SamplingParams(temperature=0.0, bad_words_token_ids=[[4, 6], [8]])  # 6 after a 4; 8 always
    out = run(x, [p] * 4, outputs=[[1, 4], [4, 1], [], [4, 1]]).token_ids.tolist()
    assert out[0] == 4  # the output ends with 4: 6 is banned, 4 is next best
    assert out[1] == 6 and out[2] == 6  # 4 not at the tail (or no output at all): 6 is fine
    assert out[3] == 6  # 8 is banned everywhere although it leads


# ---- through the engine ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bias-llama")
    make_checkpoint(path, "llama3.1")
    return path


PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 2, 3], list(range(30, 60))]


def assert_bias_forces_and_bans(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    forced = llm.generate(PROMPTS, greedy.replace(logit_bias={65: 100.0}))
    assert all(o.outputs[0].token_ids == [65] * 6 for o in forced)
    for prompt, ref in zip(PROMPTS, base):
        banned = ref[0]
        out = llm.generate(prompt, greedy.replace(logit_bias={banned: -100.0}))[0].outputs[0].token_ids
        assert banned not in out and out[0] != ref[0]
    allowed = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True,
                                                   allowed_token_ids=[10, 11, 12]))
    assert all(set(o.outputs[0].token_ids) <= {10, 11, 12} for o in allowed)
    # A bad word of two tokens, the greedy output's first two: the second never follows the first.
    t0, t1 = base[0][0], base[0][1]
    out = llm.generate(PROMPTS[0], greedy.replace(bad_words_token_ids=[[t0, t1]]))[0].outputs[0].token_ids
    assert out[0] == t0 and out[1] != t1
    s = llm.engine.stats()
    assert s.num_running == 0 and s.num_free_blocks == s.num_total_blocks


def test_logit_bias_and_friends_on_the_pytorch_path(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64)
    assert llm.engine.core.runner.native is None
    assert_bias_forces_and_bans(llm)


@pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")
def test_logit_bias_and_friends_on_the_native_int4_path(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64, quantization="int4")
    runner = llm.engine.core.runner
    assert runner.native is not None
    calls = []
    real = runner.native_step
    runner.native_step = lambda batch: (calls.append(1), real(batch))[1]
    assert_bias_forces_and_bans(llm)
    assert calls


def test_bad_words_are_tokenized_with_and_without_a_leading_space(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64)
    ip = llm.engine.input_processor
    # The byte tokenizer: "ab" is two tokens; " ab" is three, a different length: not added (vLLM's
    # rule keeps the spaced form only where it is another word token). Leading spaces are dropped.
    assert ip.bad_words_token_ids(["ab", "  c", " "]) == [[97, 98], [99]]
    p = ip.check([1, 2], SamplingParams(bad_words=["ab"]))
    assert p.bad_words_token_ids == [[97, 98]]
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first = llm.generate(PROMPTS[0], greedy)[0].outputs[0].token_ids[0]
    assert 33 <= first < 127  # a printable byte ("q" with this seed): ban it as a word
    out = llm.generate(PROMPTS[0], greedy.replace(bad_words=[chr(first)]))[0].outputs[0].token_ids
    assert out[0] != first


# ---- bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": {1: -100.5}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"),
    ({"logit_bias": {1: float("inf")}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(10_000)}}, "logit_bias"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: "x"}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
    ({"allowed_token_ids": list(range(65_537))}, "allowed_token_ids"),
    ({"bad_words": ["x" * 257]}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["x"] * 129}, "bad_words"),
    ({"bad_words": "word"}, "bad_words"),
    ({"bad_words_token_ids": [[]]}, "bad_words_token_ids"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0, "min_tokens": 1}, "min_tokens"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(field), info.value


def test_string_keys_are_token_ids_and_max_tokens_zero_is_valid():
    p = SamplingParams(logit_bias={"50": 5, 7: -2.5}, max_tokens=0)
    assert p.logit_bias == {50: 5.0, 7: -2.5} and p.max_tokens == 0


def test_ids_outside_the_vocabulary_are_refused_by_the_frontend_and_the_core(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64)  # vocabulary of 258
    cases = [({"logit_bias": {99999: 1.0}}, r"logit_bias: token id 99999 is outside the vocabulary \[0, 258\)"),
             ({"allowed_token_ids": [1, 258]}, r"allowed_token_ids: token id 258 is outside"),
             ({"bad_words_token_ids": [[1, 300]]}, r"bad_words: token id 300 is outside"),
             ({"prompt_logprobs": 20}, None)]
    for kwargs, message in cases:
        params = SamplingParams(max_tokens=1, **kwargs)
        if message is None:
            llm.generate([1, 2], params)  # fine
            continue
        with pytest.raises(ValueError, match=message):
            llm.generate([1, 2], params)
        with pytest.raises(ValueError, match=message):  # the core's own check (its backstop)
            llm.engine.core.add_request(EngineCoreRequest("x", [1, 2], params, 0.0))
    small = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64, max_logprobs=5)
    with pytest.raises(ValueError, match="prompt_logprobs must be <= 5, got 6"):
        small.generate([1, 2], SamplingParams(prompt_logprobs=6))
    with pytest.raises(ValueError, match="prompt_logprobs must be <= 5, got 6"):
        small.engine.core.add_request(EngineCoreRequest("x", [1, 2], SamplingParams(prompt_logprobs=6), 0.0))
    s = llm.engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0


def test_a_prompt_filling_the_context_can_still_be_scored(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64, max_model_len=16)
    out = llm.generate(list(range(16)), SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert len(out.prompt_logprobs) == 16 and out.outputs[0].token_ids == []
    with pytest.raises(ValueError, match="no room to generate"):
        llm.generate(list(range(16)), SamplingParams(max_tokens=None))


@pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")
def test_the_default_model_on_int4_native_kernels():
    """The served default (SmolLM2's Q4_1 blocks on the native kernels): a +100 bias forces a
    token, -100 bans the answer, a bad word bans it too, and a prompt is scored with max_tokens=0."""
    llm = LLM(quantization="int4", num_kv_blocks=32, max_model_len=256)
    assert llm.engine.core.runner.native is not None
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    base = llm.generate(prompt, greedy)[0].outputs[0]
    assert "Paris" in base.text
    paris = base.token_ids[0]
    assert llm.generate(prompt, greedy.replace(logit_bias={1234: 100}))[0].outputs[0].token_ids == [1234] * 3
    banned = llm.generate(prompt, greedy.replace(logit_bias={paris: -100}))[0].outputs[0]
    assert paris not in banned.token_ids
    worded = llm.generate(prompt, greedy.replace(bad_words=["Paris"]))[0].outputs[0]
    assert "Paris" not in worded.text
    scored = llm.generate(prompt + " Paris", SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    last = scored.prompt_logprobs[-1][paris]
    assert last.rank == 1 and -2.0 < last.logprob <= 0.0  # the model's own answer, scored in context
    assert scored.outputs[0].token_ids == [] and scored.outputs[0].finish_reason == "length"
