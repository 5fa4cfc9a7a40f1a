"""Prompt logprobs against transformers (float32, random-weight models), through every way a
prompt reaches the model: whole, after a cached prefix, in chunks, recomputed after preemption,
with max_tokens=0; the native quantized path against the PyTorch path on the same tables; and
what requests that do not ask are spared."""
from __future__ import annotations

import random

import pytest
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.native import build
from tests.engine.tiny_models import make_checkpoint

TOP = 3
TOL = 2e-4
SMALL = dict(dtype="float32", num_kv_blocks=64)  # a small KV pool: the engine starts in milliseconds


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(256) for _ in range(24)]  # a common prefix: the second prompt can hit it
    return [shared + [rng.randrange(256) for _ in range(9)],
            shared + [rng.randrange(256) for _ in range(14)],
            [rng.randrange(256) for _ in range(5)],
            [rng.randrange(256)]]  # one token: nothing to score


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The checkpoint and transformers' float32 log-softmax at every position of every prompt."""
    path = tmp_path_factory.mktemp("plp-llama")
    model = make_checkpoint(path, "llama3.1")
    with torch.no_grad():
        refs = [torch.log_softmax(model(torch.tensor([p])).logits[0].float(), dim=-1) for p in prompts()]
    return path, refs


def assert_matches(out, prompt: list[int], ref: torch.Tensor, top: int = TOP) -> None:
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None
    for i in range(1, len(prompt)):
        row, tok, entry = ref[i - 1], prompt[i], plp[i]
        assert abs(entry[tok].logprob - float(row[tok])) < TOL, (i, entry[tok].logprob, float(row[tok]))
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        assert entry[tok].decoded_token is not None
        values, ids = row.topk(top)
        alts = sorted(((lp.rank, t, lp.logprob) for t, lp in entry.items() if t != tok or lp.rank <= top),
                      key=lambda x: x[0])
        alts = [a for a in alts if a[0] <= top]
        assert [a[0] for a in alts] == list(range(1, top + 1))
        for (rank, t, lp), v, want in zip(alts, values.tolist(), ids.tolist()):
            assert abs(lp - v) < TOL
            assert t == want or abs(float(row[t]) - v) < TOL  # a tie may order either way
        assert len(entry) == top + (tok not in ids.tolist())


def assert_idle(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks


MODES = {
    "default": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=6, block_size=4),  # chunks of 6 over blocks of 4
    # 56 slots; the first prompt (the least important) is preempted twice in the middle of its
    # prefill by the others: the recompute must neither lose nor repeat its prompt logprobs.
    "preemption": dict(num_kv_blocks=14, block_size=4, max_num_batched_tokens=12, scheduling_policy="priority"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_prompt_logprobs_match_transformers(ckpt, mode):
    path, refs = ckpt
    llm = LLM(str(path), **{**SMALL, **MODES[mode]})
    ps = prompts()
    # max_tokens=0 scores the prompt only; with tokens to generate they come after it.
    params = [SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=TOP),
              SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=TOP),
              SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=TOP),
              SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=TOP)]
    for _ in range(2):  # the second pass finds every prompt's blocks in the prefix cache
        outs = llm.generate(ps, params, priority=[1, 0, 0, 0])
        for out, prompt, ref, p in zip(outs, ps, refs, params):
            assert_matches(out, prompt, ref)
            comp = out.outputs[0]
            assert comp.finish_reason == "length" and len(comp.token_ids) == p.max_tokens
            assert out.num_cached_tokens == 0  # computed, not read from the cache
    assert_idle(llm)
    if mode == "preemption":
        assert llm.engine.stats().num_preemptions > 0


def test_a_cached_prefix_is_recomputed_and_still_shared(ckpt):
    path, refs = ckpt
    llm = LLM(str(path), **SMALL, block_size=4)
    ps = prompts()
    plain = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(ps[0], plain)  # caches the shared prefix
    hits = llm.engine.stats().prefix_cache_hits
    out = llm.generate(ps[1], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))[0]
    assert_matches(out, ps[1], refs[1], top=2)
    assert llm.engine.stats().prefix_cache_hits == hits  # it looked nothing up
    # ...but its blocks were cached for others: a plain request now hits its whole prompt.
    again = llm.generate(ps[1], plain)[0]
    assert again.num_cached_tokens == (len(ps[1]) - 1) // 4 * 4
    assert_idle(llm)


def test_n_children_share_one_set_of_prompt_logprobs(ckpt):
    path, refs = ckpt
    llm = LLM(str(path), **SMALL)
    calls = []
    runner = llm.engine.core.runner
    real = runner.prompt_logprobs
    runner.prompt_logprobs = lambda hidden, spans: (calls.append(len(spans)), real(hidden, spans))[1]
    ps = prompts()
    out = llm.generate(ps[0], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=3, prompt_logprobs=0))[0]
    assert len(out.outputs) == 3
    plp = out.prompt_logprobs
    assert len(plp) == len(ps[0]) and plp[0] is None
    for i in range(1, len(ps[0])):  # 0 alternatives: the prompt token alone
        assert list(plp[i]) == [ps[0][i]]
        assert abs(plp[i][ps[0][i]].logprob - float(refs[0][i - 1, ps[0][i]])) < TOL
    assert calls == [1]  # one child computed them, once


def test_requests_without_prompt_logprobs_pay_nothing(ckpt):
    path, _ = ckpt
    llm = LLM(str(path), **SMALL)
    runner = llm.engine.core.runner
    rows = []
    real = runner.model.compute_logits
    runner.model.compute_logits = lambda h: (rows.append(h.shape[0]), real(h))[1]
    runner.prompt_logprobs = lambda *a: pytest.fail("prompt logprobs computed for nobody")
    outs = llm.generate(prompts(), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert all(o.prompt_logprobs is None for o in outs)
    assert rows and max(rows) <= len(prompts())  # the sampling rows only


@pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")
def test_native_path_computes_them_as_the_pytorch_path_does(ckpt):
    """int4 on the native kernels: the fused step's prompt logprobs equal the PyTorch model's on
    the same quantized tables, the scored token's logit is exact (not the head's 4-bit ranking)."""
    path, _ = ckpt
    llm = LLM(str(path), **SMALL, quantization="int4", block_size=4, max_num_batched_tokens=16)
    runner = llm.engine.core.runner
    assert runner.native is not None
    ps = prompts()
    p = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=TOP)
    native_calls = []
    real = runner.native_step
    runner.native_step = lambda batch: (native_calls.append(1), real(batch))[1]
    fused = llm.generate(ps, p)
    assert native_calls
    runner.native = None  # the same tables, one PyTorch op at a time
    plain = llm.generate(ps, p)
    for a, b, prompt in zip(fused, plain, ps):
        for i in range(1, len(prompt)):
            for tok, lp in b.prompt_logprobs[i].items():
                assert abs(a.prompt_logprobs[i][tok].logprob - lp.logprob) < 0.05
    # The scored token's logit is the exact product with the stored head rows.
    head = runner.model.head_q
    h = torch.randn(4, runner.model.config.hidden_size)
    ids = torch.tensor([0, 5, 100, 257])
    exact = (head.dequantized()[ids] * h).sum(-1)
    assert torch.allclose(head.token_logits(h, ids), exact, atol=1e-4)
    assert_idle(llm)


def test_fake_runner_gives_prompt_logprobs_and_zero_token_requests(ckpt):
    path, _ = ckpt
    llm = LLM(str(path), load_format="fake", num_kv_blocks=64, max_num_batched_tokens=8)
    ps = prompts()
    out = llm.generate(ps[0], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert out.finished and out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    plp = out.prompt_logprobs
    assert len(plp) == len(ps[0]) and plp[0] is None
    assert all(plp[i][ps[0][i]].rank == 1 and len(plp[i]) == 2 for i in range(1, len(ps[0])))
    assert llm.generate(ps[0], SamplingParams(max_tokens=2))[0].prompt_logprobs is None


def test_across_the_socket_with_an_engine_core_process():
    """The API process's client and a core process (the fake runner): the new fields cross the
    wire both ways, a max_tokens=0 request ends with its prompt logprobs and no token."""
    import asyncio

    from lockgate.engine.config import EngineConfig
    from lockgate.engine.frontend.client import AsyncEngineClient

    async def main() -> None:
        client = AsyncEngineClient(EngineConfig(load_format="fake", num_kv_blocks=64, max_model_len=256),
                                   stall_timeout_s=None)
        await client.start()
        try:
            params = SamplingParams(max_tokens=0, prompt_logprobs=2, logit_bias={"5": 1.5},
                                    allowed_token_ids=[5, 6], bad_words=["foo"])
            outs = [o async for o in client.generate("r", "Hello there, how are you?", params)]
            last = outs[-1]
            assert last.finished and last.outputs[0].token_ids == [] and last.outputs[0].finish_reason == "length"
            plp = last.prompt_logprobs
            assert plp[0] is None and len(plp) == len(last.prompt_token_ids) > 3
            assert all(len(e) == 2 and e[t].rank == 1 for e, t in zip(plp[1:], last.prompt_token_ids[1:]))
            with pytest.raises(ValueError, match="logit_bias: token id 99999 is outside the vocabulary"):
                client.add_request("s", "Hi", SamplingParams(logit_bias={99999: 1}))
        finally:
            await client.shutdown()

    asyncio.run(main())


def test_the_int8_head_scores_any_token_exactly():
    """PyTorch's int8 head (QuantEmbedding): `token_logits` is the product with the stored row,
    what its refined candidates get, for tokens outside them too."""
    from lockgate.engine.quant.linear import QuantEmbedding, quantize_rows

    torch.manual_seed(0)
    w = torch.randn(300, 64)
    head = QuantEmbedding(*quantize_rows(w), torch.float32)
    h = torch.randn(5, 64)
    ids = torch.tensor([0, 17, 150, 299, 3])
    stored = head.qweight.float() * head.row_scale.float()
    assert torch.allclose(head.token_logits(h, ids), (stored[ids] * h).sum(-1), atol=1e-4)
    top = head.logits(h).argmax(-1)  # a refined candidate: the same value both ways
    assert torch.allclose(head.token_logits(h, top), head.logits(h).gather(1, top[:, None])[:, 0], atol=1e-4)
