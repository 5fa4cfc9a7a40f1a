"""Structured outputs in the engine (engine/structured/): grammar-constrained decoding with llguidance.

Tiny random-weight models (a byte-level vocabulary: one token per character) and the embedded
default model: outputs that parse and validate, regex/choice/GBNF/Lark, unconstrained rows in
the same batch untouched, n > 1, logprobs, preemption, compiles off the step, the cache bound,
bad grammars refused (frontend) or failed alone (core), the sampler's masks, the fake runner.
"""
from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import msgspec
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from lockgate import LLM, SamplingParams
from lockgate.engine.core.sampler import GrammarRows, Sampler, SamplingBatch, unpack_bitmask
from lockgate.engine.errors import RequestRejectedError
from lockgate.engine.frontend.supervisor import CoreCounters
from lockgate.engine.messages import StepOutputs
from lockgate.engine.native import build
from lockgate.engine.structured import grammar as grammar_mod
from lockgate.engine.structured.cache import GrammarCache
from lockgate.engine.structured.compiler import GrammarCompiler, compile_grammar
from lockgate.engine.structured.decoding import StructuredDecoding
from lockgate.engine.structured.tokenizer import build_ll_tokenizer
from lockgate.engine.structured_params import StructuredOutputs
from tests.engine.tiny_models import make_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "owl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "ok": {"type": "boolean"}},
                  "required": ["id", "ok"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "owner", "tags"],
    "additionalProperties": False,
}
JSON = StructuredOutputs(json=json.dumps(SCHEMA))
REGEX = r"[a-f]{3}-[0-9]{2,4}"
GBNF = 'root ::= "(" num ("," num)? ")"\nnum ::= [1-9] [0-9]?'
LARK = 'start: "<" WORD ">"\nWORD: /[a-z]{1,5}/'
PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 2, 3], list(range(30, 60))]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured-llama")
    make_checkpoint(path, "llama3.1")
    return path


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(str(tiny_path), dtype="float32", num_kv_blocks=128)


def check_json(text: str, schema: dict = SCHEMA) -> None:
    jsonschema.validate(json.loads(text), schema)
    # Compact: no whitespace outside strings (any_whitespace is off).
    assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)), text


def params(so: StructuredOutputs, **kw) -> SamplingParams:
    return SamplingParams(temperature=kw.pop("temperature", 1.0), seed=kw.pop("seed", 1),
                          max_tokens=kw.pop("max_tokens", 200), structured=so, **kw)


# ---- end to end on the tiny model (PyTorch path) ---------------------------------------------


def test_json_schema_outputs_parse_and_validate(llm):
    outs = llm.generate(PROMPTS, [params(JSON, seed=s) for s in range(len(PROMPTS))])
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        check_json(c.text)
    # Greedy too (the model's argmax inside the grammar).
    c = llm.generate(PROMPTS[0], params(JSON, temperature=0.0))[0].outputs[0]
    check_json(c.text)


def test_json_object_regex_choice_gbnf_and_lark(llm):
    cases = [
        (StructuredOutputs(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutputs(regex=REGEX), lambda t: re.fullmatch(REGEX, t)),
        (StructuredOutputs(choice=["alpha", "beta", "gamma delta"]), lambda t: t in ("alpha", "beta", "gamma delta")),
        (StructuredOutputs(grammar=GBNF), lambda t: re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)?\)", t)),
        (StructuredOutputs(grammar=LARK), lambda t: re.fullmatch(r"<[a-z]{1,5}>", t)),
    ]
    for so, ok in cases:
        for seed in range(3):
            c = llm.generate(PROMPTS[seed], params(so, seed=seed))[0].outputs[0]
            if so.json_object and c.finish_reason == "length":
                continue  # any object may run long on random weights; the schema cases are bounded
            assert c.finish_reason == "stop" and ok(c.text), (so.kind, c.text)


def test_unconstrained_rows_in_the_same_batch_are_untouched(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)]
    mixed = llm.generate(PROMPTS + PROMPTS[:2], [greedy] * 3 + [params(JSON), params(StructuredOutputs(regex=REGEX))])
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    check_json(mixed[3].outputs[0].text)
    assert re.fullmatch(REGEX, mixed[4].outputs[0].text)


def test_n_children_each_valid_with_logprobs(llm):
    out = llm.generate(PROMPTS[1], params(JSON, n=3, logprobs=2, temperature=1.2))[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        check_json(c.text)
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        # The model's own logprobs: the sampled token's entry is a log-probability.
        assert all(lp[t].logprob <= 0.0 for lp, t in zip(c.logprobs, c.token_ids))
    assert len({c.text for c in out.outputs}) > 1  # each child its own matcher and draw


def test_stop_strings_max_tokens_and_min_tokens(llm):
    c = llm.generate(PROMPTS[0], params(JSON, max_tokens=5))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5 and c.text.startswith('{"')
    c = llm.generate(PROMPTS[0], params(StructuredOutputs(regex="abc-[0-9]{3}"), stop=["-"]))[0].outputs[0]
    assert c.text == "abc" and c.finish_reason == "stop"
    # min_tokens longer than the grammar: the complete grammar wins (EOS is its only token).
    c = llm.generate(PROMPTS[0], params(StructuredOutputs(choice=["ok"]), min_tokens=10))[0].outputs[0]
    assert c.text == "ok" and c.finish_reason == "stop"
    c = llm.generate(PROMPTS[0], params(StructuredOutputs(choice=["ok"]), ignore_eos=True))[0].outputs[0]
    assert c.text == "ok" and c.finish_reason == "stop"


def test_preemption_keeps_the_grammar_state(tiny_path):
    # 12 blocks of 4 tokens: three requests of ~40 tokens each cannot all stay: recompute preemption.
    small = LLM(str(tiny_path), dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=16)
    regex = r"[a-z]{30}"
    outs = small.generate(PROMPTS[:2] + [PROMPTS[2][:6]], [params(StructuredOutputs(regex=regex), seed=s,
                                                                   max_tokens=40) for s in range(3)])
    assert small.engine.stats().num_preemptions > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop" and re.fullmatch(regex, o.outputs[0].text)


def test_prefix_caching_and_chunked_prefill(tiny_path):
    chunked = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=8,
                  enable_prefix_caching=True)
    long = list(range(1, 40))
    outs = chunked.generate([long, long], [params(JSON, seed=1), params(JSON, seed=2)])
    for o in outs:
        check_json(o.outputs[0].text)
    assert chunked.engine.stats().prefix_cache_hits > 0


@pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")
def test_native_int4_path(tiny_path):
    native = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64, quantization="int4")
    assert native.engine.core.runner.native is not None
    outs = native.generate(PROMPTS, [params(JSON, seed=s) for s in range(3)])
    for o in outs:
        check_json(o.outputs[0].text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_path(tiny_path):
    gpu = LLM(str(tiny_path), dtype="float32", num_kv_blocks=64, device="cuda")
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = gpu.generate(PROMPTS + PROMPTS, [greedy] * 3 + [params(JSON, seed=s) for s in range(3)])
    alone = [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, greedy)]
    assert [o.outputs[0].token_ids for o in outs[:3]] == alone
    for o in outs[3:]:
        check_json(o.outputs[0].text)


# ---- compiles off the step, failures, the cache ---------------------------------------------


def test_a_slow_compile_does_not_hold_up_a_running_request(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=128)
    engine = llm.engine
    compiler = engine.core.structured.compiler
    gate, started = threading.Event(), threading.Event()
    big = {"type": "object", "properties": {f"f{i}": {"enum": [f"v{j}" for j in range(30)]} for i in range(300)},
           "required": ["f0"], "additionalProperties": False}

    def slow(tok, spec):  # the real compile of a big schema, held until the test lets it go
        started.set()
        assert gate.wait(30)
        return compile_grammar(tok, spec)

    compiler.compile_fn = slow
    engine.add_request("plain", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    got: dict[str, list[int]] = {"plain": [], "json": []}

    def step() -> None:
        for out in engine.step():
            got[out.request_id] = list(out.outputs[0].token_ids)

    step()
    engine.add_request("json", PROMPTS[1], params(StructuredOutputs(json=json.dumps(big))))
    assert started.wait(30)
    before = len(got["plain"])
    for _ in range(10):
        step()
    # The plain request made a token per step while the compile ran; the constrained one waited.
    assert len(got["plain"]) == before + 10 and got["json"] == []
    assert engine.core.scheduler.requests["json"].grammar_pending
    gate.set()
    while engine.has_unfinished_requests():
        step()
    text = llm.tokenizer.decode(got["json"])
    jsonschema.validate(json.loads(text), big)
    assert len(got["plain"]) == 40


def test_a_compile_failure_in_the_core_fails_only_that_request(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=128)
    engine = llm.engine

    def failing(tok, spec):
        if spec.regex == "x+":
            raise ValueError("structured_outputs.regex is invalid: too complex (test)")
        return compile_grammar(tok, spec)

    engine.core.structured.compiler.compile_fn = failing
    engine.add_request("good", PROMPTS[0], params(JSON))
    engine.add_request("bad", PROMPTS[1], params(StructuredOutputs(regex="x+"), n=2))
    finished, failed = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        failed += engine.take_failed()
    assert failed == [("bad", "structured_outputs.regex is invalid: too complex (test)")]
    check_json(finished["good"].outputs[0].text)
    assert "bad" not in finished
    s = engine.stats()
    assert s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks
    # The offline API raises it as a rejected request.
    with pytest.raises(RequestRejectedError, match="too complex"):
        llm.generate(PROMPTS[2], params(StructuredOutputs(regex="x+")))


def test_the_cache_is_bounded_by_entries_and_bytes_and_hits(llm):
    tok = build_ll_tokenizer(llm.tokenizer, 258, [257])
    specs = [StructuredOutputs(regex=f"[a-z]{{{i}}}") for i in range(1, 5)]
    cache = GrammarCache(max_entries=2, max_bytes=1 << 20)
    for so in specs[:3]:
        cache.put(so.cache_key(), compile_grammar(tok, so))
    assert len(cache) == 2 and specs[0].cache_key() not in cache and cache.evictions == 1
    assert cache.get(specs[1].cache_key()) is not None  # now the most recent: specs[2] goes next
    cache.put(specs[3].cache_key(), compile_grammar(tok, specs[3]))
    assert specs[2].cache_key() not in cache and specs[1].cache_key() in cache
    one = compile_grammar(tok, specs[0]).nbytes
    by_bytes = GrammarCache(max_entries=100, max_bytes=2 * one + 1)
    for so in specs[:3]:
        by_bytes.put(so.cache_key(), compile_grammar(tok, so))
    assert len(by_bytes) == 2 and by_bytes.nbytes <= 2 * one + 1
    # In the engine: the same schema again is a cache hit (no second compile).
    compiler = llm.engine.core.structured.compiler
    llm.generate(PROMPTS[0], params(StructuredOutputs(regex="q{3}")))
    n = compiler.num_compiled
    assert llm.generate(PROMPTS[1], params(StructuredOutputs(regex="q{3}")))[0].outputs[0].text == "qqq"
    assert compiler.num_compiled == n and llm.engine.core.structured.cache.hits > 0


# ---- bad input: refused in the frontend, naming the field ----------------------------------------


@pytest.mark.parametrize("so, field", [
    (StructuredOutputs(json='{"type": "strin"}'), "structured_outputs.json"),
    (StructuredOutputs(json='{"type": "object"'), "structured_outputs.json"),  # not JSON
    (StructuredOutputs(json="[1, 2]"), "structured_outputs.json"),
    (StructuredOutputs(json='{"type": "number", "maximum": NaN}'), "structured_outputs.json"),
    (StructuredOutputs(json='{"type": "array", "uniqueItems": true}'), "structured_outputs.json"),  # unsupported
    (StructuredOutputs(json='{"$ref": "http://example.com/s.json"}'), "structured_outputs.json"),  # never fetched
    (StructuredOutputs(json='{"type": "integer", "maximum": %d}' % 2**70), None),  # valid: a big bound
    (StructuredOutputs(json='{"type": "array", "items": ' * 5000 + "{}" + "}" * 5000), "structured_outputs.json"),
    (StructuredOutputs(regex="a(b"), "structured_outputs.regex"),
    (StructuredOutputs(regex="(" * 10000 + "a" + ")" * 10000), "structured_outputs.regex"),
    (StructuredOutputs(grammar="start: foo"), "structured_outputs.grammar"),
    (StructuredOutputs(grammar='root ::= "a'), "structured_outputs.grammar"),
    (StructuredOutputs(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
])
def test_bad_grammars_are_refused_before_the_core(llm, so, field):
    if field is None:
        llm.engine.input_processor.check([1, 2], params(so))
        return
    with pytest.raises(ValueError) as err:
        llm.generate(PROMPTS[0], params(so))
    msg = str(err.value)
    assert msg.startswith(field + " is invalid") and len(msg) < 600
    assert not llm.engine.has_unfinished_requests()


def test_structured_outputs_refuses_hostile_shapes():
    with pytest.raises(ValueError, match="at most"):
        StructuredOutputs(regex="a" * (10 << 20))
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="must be a string"):
        StructuredOutputs(json=12)  # type: ignore[arg-type]
    assert grammar_mod.to_grammar(StructuredOutputs(choice=['a"b', "c\\d"]))  # quotes and escapes are literal


# ---- the sampler ---------------------------------------------------------------------------------


def test_sampler_masks_only_the_constrained_rows():
    V = 70  # not a multiple of 32: the mask's last word is partial
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3
    allowed = [3, 33, 64]
    bm = np.zeros((1, 3), dtype=np.int32)
    for t in allowed:
        bm[0, t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(1 << 31))
    assert unpack_bitmask(torch.from_numpy(bm), V)[0].nonzero().flatten().tolist() == allowed
    ps = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=0.0),
          SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.0)]
    rows = GrammarRows(rows=[0, 2], bitmask=np.repeat(bm, 2, axis=0), complete=[False, False])
    batch = SamplingBatch.build(ps, [[]] * 4, [[]] * 4, [None] * 4, V, torch.device("cpu"), [V - 1], grammar=rows)
    out = Sampler()(x.clone(), batch)
    tokens = out.token_ids.tolist()
    assert tokens[0] == max(allowed, key=lambda t: x[0, t]) and tokens[2] in allowed
    assert tokens[1] == int(x[1].argmax()) and tokens[3] == int(x[3].argmax())
    assert torch.allclose(out.logprobs[0], torch.log_softmax(x[0], -1)[tokens[0]])  # the model's own
    # A complete grammar (only EOS) beats min_tokens' ban of EOS.
    eos = np.zeros((1, 3), dtype=np.int32)
    eos[0, (V - 1) // 32] = 1 << ((V - 1) % 32)
    done = GrammarRows(rows=[0], bitmask=eos, complete=[True])
    b = SamplingBatch.build([SamplingParams(temperature=0.0, min_tokens=5)], [[]], [[]], [None], V,
                            torch.device("cpu"), [V - 1], grammar=done)
    assert Sampler()(x[:1].clone(), b).token_ids.tolist() == [V - 1]


# ---- the fake runner ------------------------------------------------------------------------------


def test_fake_runner_produces_grammar_valid_tokens(tiny_path):
    fake = LLM(str(tiny_path), load_format="fake", num_kv_blocks=64)
    outs = fake.generate(PROMPTS, [params(StructuredOutputs(choice=["red", "green"])),
                                   params(StructuredOutputs(regex=REGEX)), params(JSON, max_tokens=300)])
    assert outs[0].outputs[0].text in ("red", "green") and outs[0].outputs[0].finish_reason == "stop"
    assert re.fullmatch(REGEX, outs[1].outputs[0].text)
    c = outs[2].outputs[0]
    if c.finish_reason == "stop":
        check_json(c.text)
    else:
        assert c.text.startswith('{"')


def test_through_the_core_process(tiny_path):
    """The API process's client and a core process (fake runner): `structured` crosses the socket
    with msgspec, the core's masks keep the output in the grammar, bad grammars are refused here."""
    import asyncio

    from lockgate.engine.config import EngineConfig
    from lockgate.engine.frontend.client import AsyncEngineClient

    async def main() -> None:
        client = AsyncEngineClient(EngineConfig(model=str(tiny_path), load_format="fake", num_kv_blocks=64),
                                   stall_timeout_s=None)
        await client.start()
        try:
            so = StructuredOutputs(choice=["north", "south", "east"])
            outs = [o async for o in client.generate("c", PROMPTS[0], params(so, n=2))]
            assert outs[-1].finished and [c.text for c in outs[-1].outputs] != []
            assert all(c.text in so.choice and c.finish_reason == "stop" for c in outs[-1].outputs)
            outs = [o async for o in client.generate("r", PROMPTS[1], params(StructuredOutputs(regex=REGEX)))]
            assert re.fullmatch(REGEX, outs[-1].outputs[0].text)
            with pytest.raises(ValueError, match=r"^structured_outputs\.regex is invalid"):
                client.add_request("bad", PROMPTS[0], params(StructuredOutputs(regex="a(b")))
        finally:
            await client.shutdown()

    asyncio.run(main())


# ---- compile time limit, per-tenant compile bound, stats and metrics -------------------------------


def _until(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_a_compile_over_the_time_limit_fails_its_requests_and_the_queue_moves_on(tiny_path):
    llm = LLM(str(tiny_path), dtype="float32", num_kv_blocks=128, grammar_compile_timeout_s=1.0)
    engine = llm.engine
    compiler = engine.core.structured.compiler
    gate = threading.Event()

    def stuck(tok, spec):  # llguidance cannot be interrupted: a compile that never ends until released
        if spec.regex == "s+":
            assert gate.wait(60)
        return compile_grammar(tok, spec)

    compiler.compile_fn = stuck
    engine.add_request("stuck", PROMPTS[0], params(StructuredOutputs(regex="s+"), n=2))
    engine.add_request("next", PROMPTS[1], params(StructuredOutputs(regex="q{3}")))
    engine.add_request("plain", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    finished, failed = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        failed += engine.take_failed()
    message = "structured_outputs.regex: grammar compile exceeded the 1 s limit"
    assert failed == [("stuck", message)]  # both children, failed once as their parent
    # The next grammar compiled on a new worker while the stuck one still ran; the plain request ran.
    assert finished["next"].outputs[0].text == "qqq" and len(finished["plain"].outputs[0].token_ids) == 5
    s = engine.core.stats()
    assert s.num_running == s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks
    # The same grammar again fails at once (remembered as too slow), without another stuck thread.
    with pytest.raises(RequestRejectedError, match="exceeded the 1 s limit"):
        llm.generate(PROMPTS[0], params(StructuredOutputs(regex="s+")))
    st = engine.core.stats().structured
    assert (st.compiles_timeout, st.compiles_rejected, st.compiles_ok) == (1, 1, 1)
    # Released, the abandoned thread drops its compile (not cached) and ends; one worker is left.
    gate.set()
    _until(lambda: compiler._alive == 1)
    assert StructuredOutputs(regex="s+").cache_key() not in engine.core.structured.cache
    assert llm.generate(PROMPTS[1], params(StructuredOutputs(regex="r{2}")))[0].outputs[0].text == "rr"


def test_at_most_max_threads_compile_threads_and_the_last_one_takes_the_queue_back(llm):
    tok = build_ll_tokenizer(llm.tokenizer, 258, [257])
    compiler = GrammarCompiler(lambda: tok, GrammarCache(), timeout_s=0.05, max_threads=2)
    gate = threading.Event()

    def stuck(t, spec):
        if spec.regex.startswith("s"):
            assert gate.wait(60)
        return compile_grammar(t, spec)

    compiler.compile_fn = stuck
    jobs = [compiler.submit(StructuredOutputs(regex=r)) for r in ("s1", "s2", "ok")]
    # Two over the limit: two abandoned threads, and no third thread (the bound): "ok" waits.
    _until(lambda: (compiler.expire(), jobs[1].done)[1])
    assert jobs[0].error and jobs[1].error and "exceeded the 0.05 s limit" in jobs[0].error
    assert compiler._alive == 2 and not jobs[2].done
    gate.set()  # the stuck compiles end: one thread takes the queue back and compiles "ok"
    _until(lambda: jobs[2].done)
    assert jobs[2].error is None and jobs[2].compiled is not None
    _until(lambda: compiler._alive == 1)
    assert compiler.num_timed_out == 2 and compiler.num_compiled == 1
    compiler.close()


def test_a_tenant_queue_is_bounded_and_others_compile_promptly(llm):
    tok = build_ll_tokenizer(llm.tokenizer, 258, [257])
    compiler = GrammarCompiler(lambda: tok, GrammarCache(), max_queued_per_tenant=8)
    permits, order = threading.Semaphore(0), []

    def gated(t, spec):  # each compile waits for a permit: the test decides when compiles happen
        assert permits.acquire(timeout=60)
        order.append(spec.regex)
        return compile_grammar(t, spec)

    compiler.compile_fn = gated
    flood = [compiler.submit(StructuredOutputs(regex=f"a{{{i}}}"), "A") for i in range(1, 2)]
    _until(lambda: bool(compiler._running))  # the worker holds A's first job; the rest queue
    flood += [compiler.submit(StructuredOutputs(regex=f"a{{{i}}}"), "A") for i in range(2, 10)]
    assert compiler.num_queued == 8 and not any(j.done for j in flood)
    # Past the cap: failed at once, naming the field; a grammar already queued is shared, not refused.
    over = compiler.submit(StructuredOutputs(regex="a{99}"), "A")
    assert over.done and over.error == ("structured_outputs.regex: too many grammar compiles queued for this "
                                        "tenant (8); retry when earlier ones finish")
    assert compiler.submit(StructuredOutputs(regex="a{5}"), "A") is flood[4]
    other = compiler.submit(StructuredOutputs(regex="b{2}"), "B")
    # Another tenant's compile runs after at most one more of A's, not behind A's eight.
    for _ in range(3):
        permits.release()
    _until(lambda: other.done)
    assert other.error is None and order.index("b{2}") <= 2, order
    assert sum(j.done for j in flood) <= 2 and compiler.num_rejected == 1
    for _ in range(len(flood)):
        permits.release()
    _until(lambda: all(j.done for j in flood))
    assert all(j.error is None for j in flood)
    compiler.close()


def test_engine_config_refuses_bad_compile_knobs():
    from lockgate.engine.config import EngineConfig
    for bad in (0, -1, float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError, match="grammar_compile_timeout_s"):
            EngineConfig(grammar_compile_timeout_s=bad)
    for bad in (0, -5, 2.5, True, 2**70 * 1.0):
        with pytest.raises(ValueError, match="max_queued_compiles_per_tenant"):
            EngineConfig(max_queued_compiles_per_tenant=bad)


def test_frontend_check_is_bounded_in_time(monkeypatch):
    so = StructuredOutputs(regex="[0-9]{1,3}-slow")
    release = threading.Event()
    real = grammar_mod.LLMatcher.validate_grammar

    def slow(grammar, *args, **kw):  # a check that does not end by itself (the pathological case)
        assert release.wait(60)
        return real(grammar, *args, **kw)

    monkeypatch.setattr(grammar_mod.LLMatcher, "validate_grammar", slow)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^structured_outputs.regex: grammar check exceeded the 0.2 s limit$"):
        grammar_mod.validate(so, timeout_s=0.2)
    assert time.monotonic() - t0 < 10
    # Remembered: refused at once; other grammars are still checked (on the pool's other thread).
    with pytest.raises(ValueError, match="exceeded"):
        grammar_mod.validate(so, timeout_s=0.2)
    release.set()
    monkeypatch.setattr(grammar_mod.LLMatcher, "validate_grammar", real)
    grammar_mod.validate(StructuredOutputs(regex="[0-9]{1,3}-fast"), timeout_s=5)
    with pytest.raises(ValueError, match="structured_outputs.regex is invalid"):
        grammar_mod.validate(StructuredOutputs(regex="(unclosed"), timeout_s=5)


def test_structured_stats_reach_the_metrics(llm):
    from lockgate.engine.frontend.queue_view import QueueView
    from lockgate.observability.metrics import _EngineCollector

    so = StructuredOutputs(regex="m{4}")
    llm.generate(PROMPTS[0], params(so))
    llm.generate(PROMPTS[1], params(so))  # a cache hit
    st = llm.engine.core.stats().structured
    assert st is not None and st.compiles_ok >= 1 and st.cache_hits >= 1 and st.cache_misses >= 1
    assert st.mask_seconds is not None and st.mask_seconds.count >= 8 and st.mask_seconds.sum > 0
    # Across the socket (msgspec), and kept across a core restart by the frontend's counters.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(StepOutputs(outputs=[], stats=llm.engine.core.stats(),
                                                                     timestamp=0.0)), type=StepOutputs)
    assert wire.stats.structured == st
    counters = CoreCounters()
    counters.stats = wire.stats
    counters.core_died()
    counters.stats = wire.stats  # the new core's own counts add to the dead one's

    state = counters.state(healthy=True, queue=QueueView(), num_in_flight=0, num_restarts=1, num_stalls=0)
    assert state.structured.compiles_ok == 2 * st.compiles_ok
    registry = CollectorRegistry()
    registry.register(_EngineCollector(lambda: state, "m"))
    text = generate_latest(registry).decode()
    assert f'lockgate:structured_compiles_total{{model_name="m",result="ok"}} {2 * st.compiles_ok:.1f}' in text
    assert 'lockgate:structured_compiles_total{model_name="m",result="timeout"} 0.0' in text
    assert f'lockgate:structured_cache_hits_total{{model_name="m"}} {2 * st.cache_hits:.1f}' in text
    assert f'lockgate:structured_mask_seconds_count{{model_name="m"}} {2 * st.mask_seconds.count:.1f}' in text
    assert "lockgate:structured_compile_seconds_total" in text
    # A core that never saw a constrained request ships nothing, and the metrics read zero.
    assert StructuredDecoding(llm.tokenizer, 258, [257]).stats() is None
    registry = CollectorRegistry()
    registry.register(_EngineCollector(lambda: CoreCounters().state(
        healthy=True, queue=QueueView(), num_in_flight=0, num_restarts=0, num_stalls=0), "m"))
    assert 'lockgate:structured_cache_hits_total{model_name="m"} 0.0' in generate_latest(registry).decode()
