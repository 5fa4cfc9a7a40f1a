"""SamplingParams: validation messages, normalisation and msgspec round trips."""
from __future__ import annotations

import msgspec
import pytest

from lockgate.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRING_LEN,
    MAX_STOP_STRINGS,
    SamplingParams,
)


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.is_greedy


@pytest.mark.parametrize(
    ("kwargs", "field", "limit"),
    [
        ({"n": 0}, "n", ">= 1"),
        ({"n": 10_000}, "n", "<="),
        ({"temperature": -1.0}, "temperature", ">= 0"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"temperature": "hot"}, "temperature", "number"),
        ({"temperature": True}, "temperature", "number"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", ">= -1"),
        ({"top_k": 2.5}, "top_k", "integer"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"seed": "abc"}, "seed", "integer"),
        ({"seed": 2**70}, "seed", "["),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
        ({"stop": 5}, "stop", "string or a list of strings, got int"),
        ({"stop": ["ok", 3]}, "stop", "string or a list of strings"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop", str(MAX_STOP_STRINGS)),
        ({"stop": ["x" * (MAX_STOP_STRING_LEN + 1)]}, "stop", str(MAX_STOP_STRING_LEN)),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "integers"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
        ({"stop_token_ids": 7}, "stop_token_ids", "list"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output", "boolean"),
        ({"ignore_eos": "yes"}, "ignore_eos", "boolean"),
        ({"skip_special_tokens": None}, "skip_special_tokens", "boolean"),
        ({"max_tokens": -1}, "max_tokens", ">= 0"),
        ({"max_tokens": True}, "max_tokens", "integer"),
        ({"min_tokens": -1}, "min_tokens", ">= 0"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "<= max_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs", f"<= {MAX_LOGPROBS}"),
        ({"logprobs": -1}, "logprobs", ">= 0"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str, limit: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    msg = str(info.value)
    assert msg.startswith(field), msg
    assert limit in msg, msg


def test_exact_messages() -> None:
    cases = {
        "temperature must be >= 0, got -1.0": {"temperature": -1.0},
        "top_p must be in (0, 1], got 1.5": {"top_p": 1.5},
        "logprobs must be <= 20, got 21": {"logprobs": 21},
        "stop must be a string or a list of strings, got int": {"stop": 3},
    }
    for message, kwargs in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
            SamplingParams(**kwargs)


def test_normalisation() -> None:
    p = SamplingParams(stop="###", temperature=1, stop_token_ids=(5, 6))
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 6]
    assert isinstance(p.temperature, float)
    assert p.max_stop_len == 3
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None
    assert SamplingParams(top_k=-1).top_k_enabled is False


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-6}, True),
        ({"top_k": 1, "temperature": 0.8}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": 2}, False),
    ],
)
def test_is_greedy(kwargs: dict, greedy: bool) -> None:
    assert SamplingParams(**kwargs).is_greedy is greedy


def test_replace_and_clone_copy_lists_and_validate() -> None:
    p = SamplingParams(stop=["a"], stop_token_ids=[1], seed=3)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("b")
    q.stop_token_ids.append(2)
    assert p.stop == ["a"] and p.stop_token_ids == [1]
    r = p.replace(temperature=0.5, max_tokens=4)
    assert (r.temperature, r.max_tokens, r.seed) == (0.5, 4, 3)
    with pytest.raises(ValueError, match="temperature"):
        p.replace(temperature=-2)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(
            n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=2**63, presence_penalty=0.5,
            frequency_penalty=-0.5, repetition_penalty=1.2, stop=["\n\n", "###"], stop_token_ids=[2, 7],
            include_stop_str_in_output=True, max_tokens=None, min_tokens=3, ignore_eos=True, logprobs=5,
            skip_special_tokens=False, spaces_between_special_tokens=False,
        ),
    ],
)
@pytest.mark.parametrize("codec", [msgspec.msgpack, msgspec.json])
def test_msgspec_round_trip(params: SamplingParams, codec) -> None:
    decoded = codec.decode(codec.encode(params), type=SamplingParams)
    assert decoded == params


def test_msgspec_decode_validates() -> None:
    raw = msgspec.msgpack.encode({"temperature": -1.0})
    with pytest.raises((ValueError, msgspec.ValidationError), match="temperature"):
        msgspec.msgpack.decode(raw, type=SamplingParams)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode({"stop": ["END"], "n": 2}), type=SamplingParams)
    assert decoded == SamplingParams(stop=["END"], n=2)


@pytest.mark.parametrize("field", ["n", "top_k", "max_tokens", "min_tokens", "logprobs"])
@pytest.mark.parametrize("value", [2**64, 2**70, -(2**70)])
def test_integers_past_any_bound_name_the_field(field: str, value: int) -> None:
    """Nothing past int32 reaches the engine (msgpack and tensors cannot carry it)."""
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(field)


def test_stop_token_ids_past_int32_are_refused() -> None:
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[2**40])
