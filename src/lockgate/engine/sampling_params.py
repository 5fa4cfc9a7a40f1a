"""Per-request sampling parameters (vLLM-compatible names and defaults).

Plain field types only, so msgspec encodes and decodes `SamplingParams` directly
(msgspec runs `__post_init__` on decode, so what crosses a socket is validated too).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from lockgate.engine.structured_params import StructuredOutputs

MAX_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 128
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
LOGIT_BIAS_LIMIT = 100.0  # |bias| (OpenAI's range)
MAX_ALLOWED_TOKEN_IDS = 65536
MAX_BAD_WORDS = 128
MAX_BAD_WORD_LEN = 256  # characters
# bad_words_token_ids (set by the frontend from bad_words: each word with and without a leading
# space): bounds for what crosses the socket.
MAX_BAD_WORDS_TOKEN_IDS = 2 * MAX_BAD_WORDS
MAX_BAD_WORD_TOKENS = 4 * MAX_BAD_WORD_LEN + 1  # a byte-level tokenizer gives up to 4 per character
# Below this a temperature is treated as greedy (as vLLM does): dividing by it
# would overflow and the distribution is a point mass for all practical purposes.
GREEDY_TEMPERATURE_EPS = 1e-5
_SEED_MIN = -(2**63)  # the range torch.Generator.manual_seed accepts
_SEED_MAX = 2**64 - 1
# Counts and ids past int32 mean nothing to the engine, and past 64 bits they cannot
# cross the socket (msgpack) or enter a tensor: refuse them here, with the field's name.
MAX_INT = 2**31 - 1


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_int(name: str, value: Any, limit: int | None = MAX_INT) -> int:
    # bool is an int subclass; True where a count is expected is a client bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {_type_name(value)}")
    if limit is not None and not -limit <= value <= limit:
        raise ValueError(f"{name} must be between {-limit} and {limit}, got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _token_id_list(name: str, ids: Any, limit: int) -> list[int]:
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {_type_name(ids)}")
    if len(ids) > limit:
        raise ValueError(f"{name} must have at most {limit} ids, got {len(ids)}")
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool):
            raise ValueError(f"{name} must be a list of token ids (integers), got {_type_name(i)} in the list")
        if not 0 <= i <= MAX_INT:
            raise ValueError(f"{name} must hold token ids in [0, {MAX_INT}], got {i}")
    return list(ids)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean, got {_type_name(value)}")
    return value


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16  # None: up to the context limit (the engine fills it in)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs; 0 = only the sampled token's
    # Logprob of every prompt token (given the ones before it) plus this many top alternatives per
    # position; 0: the prompt token's own only. Counts against MAX_LOGPROBS like `logprobs`.
    prompt_logprobs: int | None = None
    # Token id -> bias added to its logit before sampling, in [-100, 100] (OpenAI's logit_bias).
    logit_bias: dict[int, float] | None = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids).
    allowed_token_ids: list[int] | None = None
    # Words that must not be generated (vLLM's bad_words); the frontend tokenizes them into
    # `bad_words_token_ids`, which is what the engine core applies.
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # The output must match a JSON schema, regex, choice or grammar (engine/structured/).
    structured: StructuredOutputs | None = None
    # A pooling request (embeddings): the prompt runs through the model like a prefill and the
    # request returns the mean of its final-normed hidden states, L2-normalized; nothing is sampled
    # (max_tokens must be 0).
    embed: bool = False

    def __post_init__(self) -> None:
        self.n = _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be >= 1 and <= {MAX_N}, got {self.n}")

        self.temperature = _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1 disables it), got {self.top_k}")
        self.min_p = _check_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

        if self.seed is not None:
            self.seed = _check_int("seed", self.seed, limit=None)  # its own range, just below
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise ValueError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed}")

        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
            setattr(self, name, value)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

        self._normalize_stop()
        self._normalize_stop_token_ids()

        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            _check_bool(name, getattr(self, name))

        if self.max_tokens is not None:
            self.max_tokens = _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 0:  # 0: prefill only (prompt logprobs), no output token
                raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        self.min_tokens = _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )

        if self.logprobs is not None:
            self.logprobs = _check_int("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _check_int("prompt_logprobs", self.prompt_logprobs)
            if not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}")

        self._normalize_logit_bias()
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_id_list("allowed_token_ids", self.allowed_token_ids,
                                                    MAX_ALLOWED_TOKEN_IDS)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
        self._normalize_bad_words()
        if _check_bool("embed", self.embed):
            self._check_embed()

    def _check_embed(self) -> None:
        if self.max_tokens != 0:
            raise ValueError(f"embed needs max_tokens=0 (a pooling request samples nothing), got {self.max_tokens}")
        if self.n != 1:
            raise ValueError(f"embed needs n=1, got {self.n}")
        if self.prompt_logprobs is not None or self.structured is not None:
            raise ValueError("embed cannot be combined with prompt_logprobs or structured outputs")

    def _normalize_stop(self) -> None:
        stop = self.stop
        if stop is None:
            return
        if isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {_type_name(stop)}")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must be a string or a list of strings, got {_type_name(s)} in the list")
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_LEN} characters, got {len(s)}")
        self.stop = stop

    def _normalize_stop_token_ids(self) -> None:
        ids = self.stop_token_ids
        if ids is None:
            return
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {_type_name(ids)}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool):
                raise ValueError(f"stop_token_ids must be a list of integers, got {_type_name(i)} in the list")
            if i < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {i}")
            if i > MAX_INT:
                raise ValueError(f"stop_token_ids must be <= {MAX_INT}, got {i}")
        self.stop_token_ids = list(ids)

    def _normalize_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be an object mapping token ids to biases, got {_type_name(bias)}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            tid = key
            if isinstance(key, str):  # JSON object keys are strings: "50256" -> 50256
                text = key.strip()
                if not (text.isascii() and text.isdigit()):
                    raise ValueError(f"logit_bias keys must be token ids (integers), got {key!r}")
                tid = int(text)
            if not isinstance(tid, int) or isinstance(tid, bool):
                raise ValueError(f"logit_bias keys must be token ids (integers), got {_type_name(key)}")
            if not 0 <= tid <= MAX_INT:
                raise ValueError(f"logit_bias keys must be token ids in [0, {MAX_INT}], got {tid}")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"logit_bias values must be numbers, got {_type_name(value)} for token {tid}")
            v = float(value)
            if not (math.isfinite(v) and -LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT):
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value!r} for token {tid}")
            out[tid] = v  # "5" and 5 (or "05") name one token: the last one given wins
        self.logit_bias = out

    def _normalize_bad_words(self) -> None:
        words = self.bad_words
        if words is not None:
            if not isinstance(words, (list, tuple)):
                raise ValueError(f"bad_words must be a list of strings, got {_type_name(words)}")
            if len(words) > MAX_BAD_WORDS:
                raise ValueError(f"bad_words must have at most {MAX_BAD_WORDS} words, got {len(words)}")
            for w in words:
                if not isinstance(w, str):
                    raise ValueError(f"bad_words must be a list of strings, got {_type_name(w)} in the list")
                if not 1 <= len(w) <= MAX_BAD_WORD_LEN:
                    raise ValueError(f"bad_words must each be 1 to {MAX_BAD_WORD_LEN} characters, got {len(w)}")
            self.bad_words = list(words)
        ids = self.bad_words_token_ids
        if ids is None:
            return
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"bad_words_token_ids must be a list of token id lists, got {_type_name(ids)}")
        if len(ids) > MAX_BAD_WORDS_TOKEN_IDS:
            raise ValueError(f"bad_words_token_ids must have at most {MAX_BAD_WORDS_TOKEN_IDS} entries, "
                             f"got {len(ids)}")
        out = [_token_id_list("bad_words_token_ids", word, MAX_BAD_WORD_TOKENS) for word in ids]
        if any(not word for word in out):
            raise ValueError("bad_words_token_ids entries must not be empty")
        self.bad_words_token_ids = out

    @property
    def has_logit_processors(self) -> bool:
        """logit_bias, allowed_token_ids or bad words: the sampler edits this row's logits."""
        return (self.logit_bias is not None or self.allowed_token_ids is not None
                or self.bad_words_token_ids is not None)

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 keeps only the argmax, so it is greedy too (and needs no random draw).
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0) if self.stop else 0

    def replace(self, **changes: Any) -> SamplingParams:
        """A validated copy with some fields changed (lists are copied, not shared)."""
        out = dataclasses.replace(self, **changes)
        for name in ("stop", "stop_token_ids", "allowed_token_ids", "bad_words"):
            value = getattr(out, name)
            if value is not None and value is getattr(self, name):
                setattr(out, name, list(value))
        if out.logit_bias is not None and out.logit_bias is self.logit_bias:
            out.logit_bias = dict(out.logit_bias)
        if out.bad_words_token_ids is not None and out.bad_words_token_ids is self.bad_words_token_ids:
            out.bad_words_token_ids = [list(w) for w in out.bad_words_token_ids]
        return out

    def clone(self) -> SamplingParams:
        return self.replace()
