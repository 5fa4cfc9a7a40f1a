"""Incremental detokenizer: streaming equals a full decode; stop strings never leak."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lockgate.engine.frontend.detokenizer import IncrementalDetokenizer
from lockgate.engine.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a small corpus. Héllo wörld café naïve résumé façade.",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "emoji 😀🎉👍🏽 are fun, so are flags 🇫🇷 and families 👨‍👩‍👧.",
    "The quick brown fox jumps over the lazy dog. ### END ###",
    "def main():\n    return 42  # answer\n\n",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_end|>"]

SAMPLES = [
    "Hello world",
    "Héllo wörld, café naïve résumé",
    "日本語のテキストです。中文文本。",
    "emoji 😀🎉👍🏽 are fun 🇫🇷 👨‍👩‍👧",
    "mixed: añb 日x😀y ñ",
    "  leading and   multiple   spaces\n\ttabs\n",
    "unseen chars: Ω≈ç√∫˜µ≤ 🦀 𝕏",
    "The quick brown fox jumps over the lazy dog. ### END ###",
]


class Adapter:
    """The duck-typed interface the detokenizer needs, over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]

    def special_id(self, token: str) -> int:
        return self.tok.token_to_id(token)


@pytest.fixture(scope="module")
def byte_level() -> Adapter:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return Adapter(tok)


@pytest.fixture(scope="module")
def metaspace() -> Adapter:
    # SentencePiece-like: "▁" marks a word start and the decoder drops it at the start of a decode.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return Adapter(tok)


def stream(tok: Adapter, ids: list[int], params: SamplingParams | None = None,
           prompt: list[int] | None = None, chunk: int = 1) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    det = IncrementalDetokenizer(tok, prompt or [], params or SamplingParams())
    deltas: list[str] = []
    stop = None
    for i in range(0, len(ids), chunk):
        delta, stop = det.append(ids[i:i + chunk])
        deltas.append(delta)
        assert "".join(deltas) == det.text  # `text` is exactly what was emitted
        if stop is not None:
            break
    if stop is None:
        deltas.append(det.flush())
    return det, deltas, stop


def test_byte_tokens_really_split_characters(byte_level: Adapter) -> None:
    # Guard for the tests below: some single tokens decode to incomplete characters.
    ids = byte_level.encode("😀 日本語 🦀")
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_equals_full_decode_byte_level(byte_level: Adapter, text: str, chunk: int) -> None:
    ids = byte_level.encode(text)
    det, deltas, stop = stream(byte_level, ids, chunk=chunk)
    assert stop is None
    assert "".join(deltas) == byte_level.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)  # never a half character
    assert det.token_ids == ids


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_with_prompt_context(byte_level: Adapter, metaspace: Adapter, text: str) -> None:
    for tok in (byte_level, metaspace):
        prompt = tok.encode("Q: 日本 café 😀 say something")
        out = tok.encode(" " + text)
        _, deltas, _ = stream(tok, out, prompt=prompt)
        full = tok.decode(prompt + out)
        assert tok.decode(prompt) + "".join(deltas) == full


def test_metaspace_spaces_are_kept_between_words(metaspace: Adapter) -> None:
    ids = metaspace.encode("Hello world the quick brown fox")
    assert len(ids) > 3
    _, deltas, _ = stream(metaspace, ids)
    assert "".join(deltas) == "Hello world the quick brown fox"
    # Decoding token by token would have lost the spaces.
    assert "".join(metaspace.decode([i]) for i in ids) != "Hello world the quick brown fox"


def test_random_token_soup_matches_full_decode(byte_level: Adapter) -> None:
    # Arbitrary ids can form invalid UTF-8: the stream must still equal the full decode.
    rng = random.Random(0)
    vocab = byte_level.tok.get_vocab_size()
    for _ in range(200):
        ids = [rng.randrange(2, vocab) for _ in range(rng.randrange(1, 20))]
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randrange(0, 8))]
        _, deltas, _ = stream(byte_level, ids, prompt=prompt)
        assert "".join(deltas) == byte_level.decode(ids), ids


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(byte_level: Adapter, skip: bool) -> None:
    eot = byte_level.special_id("<|im_end|>")
    a, b = byte_level.encode("Hello"), byte_level.encode(" world")
    ids = a + [eot] + b + [eot]
    _, deltas, _ = stream(byte_level, ids, SamplingParams(skip_special_tokens=skip))
    text = "".join(deltas)
    assert text == byte_level.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is (not skip)


def expected_stop(text: str, stops: list[str]) -> tuple[int, int, str] | None:
    """Reference: the stop occurrence that completes first (ties: the one starting first)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
            best = (i + len(s), i, s)
    return best


def check_stop_stream(tok: Adapter, text: str, stops: list[str], include: bool = False, chunk: int = 1) -> None:
    ids = tok.encode(text)
    full = tok.decode(ids)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    det = IncrementalDetokenizer(tok, [], params)
    want = expected_stop(full, stops)
    final = full if want is None else full[: want[0] if include else want[1]]
    emitted = ""
    got_stop = None
    for i in range(0, len(ids), chunk):
        delta, got_stop = det.append(ids[i:i + chunk])
        emitted += delta
        # Never emit anything the final text will not contain.
        assert final.startswith(emitted), (emitted, final)
        if got_stop is not None:
            break
    if got_stop is None:
        emitted += det.flush()
    assert got_stop == (want[2] if want else None)
    assert emitted == det.text == final
    if not include and want is not None:
        assert want[2] not in emitted


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("Hello world, this is a small corpus.", ["is a s"]),
        ("Hello world, this is a small corpus.", ["corpus"]),
        ("The quick brown fox ### END ###", ["###"]),
        ("日本語のテキストです。中文文本。", ["テキ"]),
        ("emoji 😀🎉 fun", ["🎉"]),
        ("emoji 😀🎉 fun", ["😀🎉 f"]),
        ("abcdef", ["cd", "bcdx", "ef"]),  # "bcdx" is held back, then "cd" completes first
        ("abcdef", ["bcd", "cd"]),  # both complete at the same char: the earlier start wins
        ("no stop here at all", ["zzz", "ally"]),
        ("Hel Hel Hello", ["Help", "Hello"]),
        ("def main():\n    return 42\n\n", ["\n\n"]),
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(byte_level: Adapter, text: str, stops: list[str], include: bool) -> None:
    check_stop_stream(byte_level, text, stops, include)
    check_stop_stream(byte_level, text, stops, include, chunk=4)


def test_stop_strings_random(byte_level: Adapter) -> None:
    rng = random.Random(1)
    alphabet = "ab é日😀 "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        check_stop_stream(byte_level, text, stops, include=rng.random() < 0.5, chunk=rng.choice([1, 2]))


def test_held_back_tail_is_released_when_resolved(byte_level: Adapter) -> None:
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["STOP!"]))
    emitted = ""
    for piece in ["Hello", " ST", "O", "P", "?"]:
        ids = byte_level.encode(piece)
        delta, stop = det.append(ids)
        emitted += delta
        assert stop is None
        if piece in (" ST", "O", "P"):
            assert not emitted.endswith(("S", "ST", "STO", "STOP"))  # could still become "STOP!"
    assert emitted == "Hello STOP?"  # "?" resolved it: everything released
    det2 = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["STOP!"]))
    d, _ = det2.append(byte_level.encode("Hello ST"))
    assert d == "Hello "
    assert det2.flush() == "ST"  # released at the end of the sequence
    assert det2.text == "Hello ST"


def test_nothing_after_stop(byte_level: Adapter) -> None:
    det = IncrementalDetokenizer(byte_level, [], SamplingParams(stop=["END"]))
    ids = byte_level.encode("one END two")
    delta, stop = det.append(ids)
    assert (delta, stop, det.stop_reason) == ("one ", "END", "END")
    assert det.finished
    # token_ids end with the token that completed the stop string; later ones are dropped.
    assert ids[: len(det.token_ids)] == det.token_ids and len(det.token_ids) < len(ids)
    assert byte_level.decode(det.token_ids).endswith("END")
    recorded = list(det.token_ids)
    assert det.append(byte_level.encode(" three")) == ("", None)
    assert det.flush() == ""
    assert det.text == "one " and det.token_ids == recorded


def test_stop_strings_ignored_before_min_tokens(byte_level: Adapter) -> None:
    ids = byte_level.encode("ab ab ab ab")
    params = SamplingParams(stop=["ab"], min_tokens=len(byte_level.encode("ab ab")))
    det = IncrementalDetokenizer(byte_level, [], params)
    emitted = ""
    stop = None
    for i in ids:
        delta, stop = det.append([i])
        emitted += delta
        if stop:
            break
    assert stop == "ab"
    assert emitted == det.text and emitted.startswith("ab ab") and not emitted.endswith("ab")


def test_transformers_tokenizer_works_directly(byte_level: Adapter) -> None:
    # The detokenizer is duck-typed: a Hugging Face fast tokenizer fits as is.
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level.tok)
    text = "Héllo 日本語 😀, the quick brown fox"
    ids = hf.encode(text, add_special_tokens=False)
    prompt = hf.encode("Q: café?", add_special_tokens=False)
    det = IncrementalDetokenizer(hf, prompt, SamplingParams(stop=["fox"]))
    emitted = ""
    for i in ids:
        delta, stop = det.append([i])
        emitted += delta
        if stop:
            break
    assert stop == "fox"
    assert emitted == det.text == text[: text.index("fox")]
