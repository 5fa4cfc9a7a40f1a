"""Tool-call parsers (`server/tool_parsers/`): whole-text parses, and streams that reassemble into
exactly the whole-text parse however the text is split."""
from __future__ import annotations

import json
import random
import re
import time

import pytest

from lockgate.server.tool_parsers import (
    ContentDelta,
    ParsedOutput,
    ToolCallDelta,
    UnknownToolParser,
    collect,
    default_parser_for,
    get_tool_parser,
    make_tool_parser,
    resolve_parser_name,
)
from lockgate.server.tool_parsers.json_text import MAX_DEPTH

TOOLS = ["get_weather", "search", "noop"]
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def canon(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False)


def hermes_call(name: str, args: object, key: str = "arguments") -> str:
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "{key}": {json.dumps(args)}}}\n</tool_call>'


def calls_of(out: ParsedOutput) -> list[tuple[str, str]]:
    return [(c.name, c.arguments) for c in out.tool_calls]


def run_stream(parser_name: str, chunks: list[str], tools: list[str] | None = TOOLS) -> list:
    s = make_tool_parser(parser_name, tools).stream()
    deltas = []
    for c in chunks:
        deltas += s.feed(c)
    return deltas + s.finish()


def check_shape(deltas: list) -> None:
    """OpenAI's streaming shape: a call's first delta has id, name and arguments="", in index order;
    later deltas of it carry only arguments; no delta is empty."""
    begun: list[int] = []
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert d.text
            continue
        assert isinstance(d, ToolCallDelta)
        if d.id is not None:
            assert CALL_ID.fullmatch(d.id) and d.name and d.arguments == ""
            assert d.index == len(begun)
            begun.append(d.index)
        else:
            assert d.name is None and d.arguments and d.index in begun


def assert_stream_matches(parser_name: str, text: str, tools: list[str] | None = TOOLS,
                          seed: int = 0, every_split: bool = True) -> ParsedOutput:
    whole = make_tool_parser(parser_name, tools).parse(text)
    splits: list[list[str]] = [[text], list(text)]
    if every_split:
        splits += [[text[:i], text[i:]] for i in range(1, len(text))]
    rnd = random.Random(seed)
    for _ in range(30):
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(1, 12)))) if len(text) > 1 else []
        splits.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    for chunks in splits:
        deltas = run_stream(parser_name, chunks, tools)
        check_shape(deltas)
        got = collect(deltas)
        assert got.content == whole.content, chunks
        assert calls_of(got) == calls_of(whole), chunks
    return whole


# ---- hermes ---------------------------------------------------------------------------------

def test_hermes_single_and_multiple_calls_with_content_before() -> None:
    text = ("Let me look that up.\n" + hermes_call("get_weather", {"city": "Paris", "days": 3}) + "\n"
            + hermes_call("search", {"q": "news", "n": 1.50, "tags": ["a", "b"], "ok": True, "x": None}))
    out = assert_stream_matches("hermes", text)
    assert out.content == "Let me look that up."
    assert calls_of(out) == [("get_weather", '{"city": "Paris", "days": 3}'),
                             ("search", '{"q": "news", "n": 1.5, "tags": ["a", "b"], "ok": true, "x": null}')]
    assert all(CALL_ID.fullmatch(c.id) for c in out.tool_calls)
    assert len({c.id for c in out.tool_calls}) == 2


def test_hermes_no_call_is_the_text_exactly() -> None:
    for text in ["Hello there!\n", "  leading and trailing  \n\n", "a < b and <tool_ is not a tag", "<tool_call",
                 "x" * 50 + " </tool_call> " + "y"]:
        out = assert_stream_matches("hermes", text, every_split=len(text) < 80)
        assert out.content == text and out.tool_calls == []


def test_hermes_content_after_and_between_calls_is_joined_by_a_newline() -> None:
    text = "Before.  " + hermes_call("noop", {}) + "\n\n Middle \n" + hermes_call("search", {"q": 1}) + "\nAfter.\n"
    out = assert_stream_matches("hermes", text)
    assert out.content == "Before.\nMiddle\nAfter.\n"
    assert [c.name for c in out.tool_calls] == ["noop", "search"]


def test_hermes_only_whitespace_around_calls_is_no_content() -> None:
    out = assert_stream_matches("hermes", "\n " + hermes_call("noop", {}) + " \n ")
    assert out.content is None and calls_of(out) == [("noop", "{}")]


@pytest.mark.parametrize("body", [
    '{"name": "search", "arguments": {"q": }}',  # malformed JSON
    '{"arguments": {"q": "x"}}',  # no name
    '{"name": "search", "arguments": [1, 2]}',  # arguments not an object
    '{"name": "search", "arguments": "not json"}',  # a string that is no object
    '{"name": 5, "arguments": {}}',  # name not a string
    '{"name": "rm_rf", "arguments": {}}',  # not among the request's tools
    '{"name": "search", "name": "noop", "arguments": {}}',  # name twice
    '{"name": "search", "arguments": {}, "parameters": {}}',  # arguments twice
    '{"name": "search", "arguments": {"x": NaN}}',  # not JSON
    '[{"name": "search"}]',
])
def test_hermes_malformed_blocks_come_back_as_content(body: str) -> None:
    text = f"Hi <tool_call>\n{body}\n</tool_call> bye " + hermes_call("noop", {"z": 1})
    out = assert_stream_matches("hermes", text)
    assert out.content == f"Hi <tool_call>\n{body}\n</tool_call> bye"
    assert calls_of(out) == [("noop", '{"z": 1}')]


def test_hermes_unfinished_block_is_content_and_missing_close_tag_is_forgiven() -> None:
    cut = 'Sure <tool_call>\n{"name": "search", "arguments": {"q": "we'
    out = assert_stream_matches("hermes", cut)
    assert out.content == cut and out.tool_calls == []
    out = assert_stream_matches("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}\n</tool')
    assert out.content is None and calls_of(out) == [("search", '{"q": "x"}')]


def test_hermes_text_between_a_call_and_its_close_tag_is_content() -> None:
    text = 'Hi <tool_call>{"name": "search", "arguments": {"q": "a"}} trailing\n</tool_call> bye'
    out = assert_stream_matches("hermes", text)
    assert calls_of(out) == [("search", '{"q": "a"}')] and out.content == "Hi\ntrailing\n bye"


def test_hermes_close_tag_inside_a_string_argument_does_not_end_the_call() -> None:
    args = {"html": "<b>not</tool_call> the end</b>", "nested": {"deep": [{"k": "<tool_call>"}]}}
    out = assert_stream_matches("hermes", hermes_call("search", args))
    assert calls_of(out) == [("search", canon(args))]


def test_hermes_tool_list_none_accepts_any_name_and_parameters_alias() -> None:
    text = hermes_call("anything", {"a": 1}, key="parameters")
    out = assert_stream_matches("hermes", text, tools=None)
    assert calls_of(out) == [("anything", '{"a": 1}')]
    assert make_tool_parser("hermes", TOOLS).parse(text).tool_calls == []


def test_hermes_arguments_as_a_json_string_are_read_as_the_object() -> None:
    text = '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"caf\\u00e9\\", \\"n\\": [1,2]}"}</tool_call>'
    out = assert_stream_matches("hermes", text)
    assert calls_of(out) == [("search", '{"q": "café", "n": [1, 2]}')]


def test_hermes_call_without_arguments_gets_an_empty_object() -> None:
    out = assert_stream_matches("hermes", '<tool_call>{"name": "noop"}</tool_call>')
    assert calls_of(out) == [("noop", "{}")]


# ---- arguments: unicode, escapes, numbers, bounds ----------------------------------------

def test_arguments_are_json_dumps_of_the_parsed_object() -> None:
    args = {"text": 'quote " backslash \\ slash / nl \n tab \t ctrl \x01 del \x7f',
            "unicode": "café 😀 日本語 \u2028", "big": 2 ** 70, "neg": -2 ** 70, "zero": -0.0, "exp": 1.5e300,
            "small": -1e-7, "list": [[], {}, [None, False]], "empty": ""}
    for ensure_ascii in (True, False):
        raw = json.dumps(args, ensure_ascii=ensure_ascii)
        text = f'<tool_call>{{"name": "search", "arguments": {raw}}}</tool_call>'
        out = assert_stream_matches("hermes", text, every_split=False)
        assert out.tool_calls[0].arguments == canon(args)
        assert json.loads(out.tool_calls[0].arguments) == args


def test_arguments_match_json_round_trip_on_random_documents() -> None:
    rnd = random.Random(7)
    alphabet = ['a', '"', '\\', '\n', '\x02', 'é', '😀', '/', ' ', '}', ']', ',', ':']

    def value(depth: int) -> object:
        k = rnd.randrange(7 if depth < 4 else 4)
        if k == 0:
            return rnd.choice([True, False, None])
        if k == 1:
            return rnd.choice([rnd.randint(-10 ** 25, 10 ** 25), rnd.randint(-3, 3)])
        if k == 2:
            return rnd.choice([0.1, -2.5e-8, 1e200, 123456.789, -0.0])
        if k == 3:
            return "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(6)))
        if k in (4, 5):
            return {"".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 4))): value(depth + 1)
                    for _ in range(rnd.randrange(4))}
        return [value(depth + 1) for _ in range(rnd.randrange(4))]

    for i in range(100):
        args = {"k": value(0), "more": value(1)}
        raw = json.dumps(args, ensure_ascii=rnd.random() < 0.5, indent=rnd.choice([None, 1]),
                         separators=rnd.choice([None, (",", ":")]))
        expected = canon(json.loads(raw))
        for name, text in (("hermes", f'<tool_call>{{"name": "search", "arguments": {raw}}}</tool_call>'),
                           ("llama3_json", f'{{"name": "search", "parameters": {raw}}}'),
                           ("json_array", f'[{{"name": "search", "arguments": {raw}}}]')):
            out = assert_stream_matches(name, text, seed=i, every_split=False)
            assert calls_of(out) == [("search", expected)], (name, raw)


def test_surrogate_escapes() -> None:
    # a pair is one character; a lone half stays escaped (UTF-8 cannot carry it) and reads back the same
    text = '<tool_call>{"name": "search", "arguments": {"pair": "\\ud83d\\ude00", "lone": "\\ud800x\\udc00"}}</tool_call>'
    out = assert_stream_matches("hermes", text)
    arguments = out.tool_calls[0].arguments
    assert arguments == '{"pair": "😀", "lone": "\\ud800x\\udc00"}'
    arguments.encode("utf-8")
    assert json.loads(arguments) == {"pair": "😀", "lone": "\ud800x\udc00"}


def test_numbers_python_cannot_write_back_keep_the_models_text() -> None:
    huge = "9" * 5000  # over int's digit limit: json.loads refuses it, yet it is valid JSON
    out = make_tool_parser("json_array", TOOLS).parse(
        f'[{{"name": "search", "arguments": {{"a": {huge}, "b": 1e400, "c": 1E2}}}}]')
    assert out.tool_calls[0].arguments == f'{{"a": {huge}, "b": 1e400, "c": 100.0}}'


@pytest.mark.parametrize("args", ["{\"a\": 01}", "{\"a\": 1.}", "{\"a\": -}", "{\"a\": Infinity}", "{\"a\": tru}",
                                  "{\"a\": \"\\x\"}", "{\"a\": \"\\u12g4\"}", "{\"a\": \"raw\ncontrol\"}",
                                  "{\"a\": [1,]}", "{\"a\": 1,}", "{a: 1}", "{\"a\" 1}"])
def test_invalid_json_arguments_are_content(args: str) -> None:
    for name, text in (("hermes", f'<tool_call>{{"name": "search", "arguments": {args}}}</tool_call>'),
                       ("llama3_json", f'{{"name": "search", "parameters": {args}}}'),
                       ("json_array", f'[{{"name": "search", "arguments": {args}}}]')):
        out = make_tool_parser(name, TOOLS).parse(text)
        assert out.tool_calls == [] and out.content == text, name


def test_deep_nesting_is_content_not_a_crash() -> None:
    deep = "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5)
    ok = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2)
    for name, template in (("hermes", '<tool_call>{{"name": "search", "arguments": {{"a": {}}}}}</tool_call>'),
                           ("llama3_json", '{{"name": "search", "parameters": {{"a": {}}}}}'),
                           ("json_array", '[{{"name": "search", "arguments": {{"a": {}}}}}]')):
        parser = make_tool_parser(name, TOOLS)
        text = template.format(deep)
        assert parser.parse(text) == ParsedOutput(content=text, tool_calls=[])
        arguments = parser.parse(template.format(ok)).tool_calls[0].arguments
        assert json.loads(arguments) == json.loads(f'{{"a": {ok}}}')
        # far deeper than Python's recursion limit: still content, no RecursionError
        huge = template.format("[" * 100_000)
        assert parser.parse(huge).tool_calls == []


def test_long_outputs_are_linear() -> None:
    body = "y" * 300_000
    cases = [("hermes", "x" * 300_000 + f'<tool_call>{{"name": "search", "arguments": {{"a": "{body}"}}}}</tool_call>'),
             ("llama3_json", f'{{"name": "search", "parameters": {{"a": "{body}"}}}}'),
             ("json_array", f'[{{"name": "search", "arguments": {{"a": "{body}", "b": [{",".join(["1"] * 20_000)}]}}}}]')]
    for name, text in cases:
        parser = make_tool_parser(name, TOOLS)
        start = time.perf_counter()
        whole = parser.parse(text)
        s = parser.stream()
        deltas = []
        for i in range(0, len(text), 4):  # ~4 characters per token
            deltas += s.feed(text[i:i + 4])
        deltas += s.finish()
        assert time.perf_counter() - start < 3.0, name  # quadratic re-parsing would take minutes
        assert calls_of(collect(deltas)) == calls_of(whole) and len(whole.tool_calls) == 1
    ten_mb = f'<tool_call>{{"name": "search", "arguments": {{"a": "{"z" * 10_000_000}"}}}}</tool_call>'
    start = time.perf_counter()
    assert len(make_tool_parser("hermes", TOOLS).parse(ten_mb).tool_calls[0].arguments) == 10_000_009
    assert time.perf_counter() - start < 3.0


def test_function_names_are_checked() -> None:
    parser = make_tool_parser("hermes", None)
    for bad in ["", "a\nb", "x" * 300, "\ud800"]:
        text = f'<tool_call>{{"name": {json.dumps(bad)}, "arguments": {{}}}}</tool_call>'
        assert parser.parse(text).tool_calls == []


# ---- llama3_json ----------------------------------------------------------------------------

def test_llama3_single_call_with_and_without_python_tag() -> None:
    for prefix in ("", "<|python_tag|>", "  <|python_tag|> ", "\n"):
        text = prefix + '{"name": "get_weather", "parameters": {"city": "Köln"}}'
        out = assert_stream_matches("llama3_json", text)
        assert out.content is None and calls_of(out) == [("get_weather", '{"city": "Köln"}')]


def test_llama3_several_calls_separated_by_semicolons() -> None:
    text = '<|python_tag|>{"name": "search", "parameters": {"q": "a"}}; {"name": "noop", "arguments": {}};{"name": "search", "parameters": {}}'
    out = assert_stream_matches("llama3_json", text)
    assert calls_of(out) == [("search", '{"q": "a"}'), ("noop", "{}"), ("search", "{}")]


def test_llama3_content_is_content() -> None:
    for text in ["The weather is nice.", '{"a": 1}', '{"name": "search", "parameters": {"q": ',
                 '<|python_tag|>brave_search.call(query="x")', '{"name": "unknown_tool", "parameters": {}}',
                 "<|python_ta", "  I think {\"name\": \"search\"} is"]:
        out = assert_stream_matches("llama3_json", text)
        assert out.content == text and out.tool_calls == []


def test_llama3_plain_content_streams_before_the_end() -> None:
    s = make_tool_parser("llama3_json", TOOLS).stream()
    assert s.feed("  ") == []  # undecided: held
    assert s.feed("Hello") == [ContentDelta("  Hello")]
    assert s.feed(" world") == [ContentDelta(" world")]


def test_llama3_text_after_valid_calls_is_content() -> None:
    out = assert_stream_matches("llama3_json", '{"name": "noop", "parameters": {}} and then some words')
    assert calls_of(out) == [("noop", "{}")] and out.content == "and then some words"
    out = assert_stream_matches("llama3_json", '{"name": "noop", "parameters": {}}; {"name": "nope", "parameters": {}}')
    assert calls_of(out) == [("noop", "{}")] and out.content == '; {"name": "nope", "parameters": {}}'


# ---- json_array -----------------------------------------------------------------------------

def test_json_array_single_and_parallel_calls() -> None:
    one = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    out = assert_stream_matches("json_array", one)
    assert out.content is None and calls_of(out) == [("get_weather", '{"city": "Paris"}')]
    many = '[{"name":"search","arguments":{"q":"a\\"b","n":[1,2,{"x":null}]}},{"name":"noop","arguments":{}}]'
    out = assert_stream_matches("json_array", many)
    assert calls_of(out) == [("search", '{"q": "a\\"b", "n": [1, 2, {"x": null}]}'), ("noop", "{}")]


def test_json_array_streams_name_first_then_arguments_as_they_arrive() -> None:
    text = '[{"name": "search", "arguments": {"query": "a long query string", "n": 3}}]'
    s = make_tool_parser("json_array", TOOLS).stream()
    seen: list = []
    head_at = None
    for i, ch in enumerate(text):
        got = s.feed(ch)
        if head_at is None and any(isinstance(d, ToolCallDelta) for d in got):
            head_at = i
            assert got[0] == ToolCallDelta(index=0, id=got[0].id, name="search", arguments="")
        seen += got
    seen += s.finish()
    assert head_at == text.index('"search"') + len('"search"') - 1  # the moment the name's string closes
    fragments = [d.arguments for d in seen if isinstance(d, ToolCallDelta) and d.id is None]
    assert len(fragments) > 10  # streamed, not in one piece
    assert "".join(fragments) == '{"query": "a long query string", "n": 3}'
    assert not any(isinstance(d, ContentDelta) for d in seen)


def test_json_array_arguments_before_name_are_held_until_the_name() -> None:
    out = assert_stream_matches("json_array", '[{"arguments": {"q": "x"}, "name": "search"}]')
    assert calls_of(out) == [("search", '{"q": "x"}')]


@pytest.mark.parametrize("text", [
    "[]", "Sorry, I can't.", '{"name": "search", "arguments": {}}', '[{"name": "nope", "arguments": {}}]',
    '[{"name": "search", "arguments": 5}]', '[{"arguments": {}}]', '[{"name": "search", "arguments": {}} {}]',
    '[{"name": "search", "arguments": {}}', '[1]', " [ ",
])
def test_json_array_that_is_not_an_array_of_calls_parses_as_content(text: str) -> None:
    out = make_tool_parser("json_array", TOOLS).parse(text)
    assert out == ParsedOutput(content=text, tool_calls=[])


def test_json_array_stream_without_a_call_sent_gives_the_text_as_content() -> None:
    for text in ["[]", "Sorry, I can't.", '[{"name": "nope", "arguments": {}}]', '[{"arguments": {"a": 1}}]']:
        assert_stream_matches("json_array", text)


def test_json_array_cut_by_max_tokens_keeps_the_streamed_prefix() -> None:
    # the grammar guarantees validity, so a call goes out as soon as its name is known; a length cut
    # leaves what was sent, while the whole-text parse refuses the unfinished array
    text = '[{"name": "search", "arguments": {"q": "unfinish'
    deltas = run_stream("json_array", [text[:25], text[25:]])
    check_shape(deltas)
    got = collect(deltas)
    assert calls_of(got) == [("search", '{"q": "unfinish')] and got.content is None
    assert make_tool_parser("json_array", TOOLS).parse(text) == ParsedOutput(content=text, tool_calls=[])


def test_json_array_text_after_the_array_is_content() -> None:
    out = assert_stream_matches("json_array", '[{"name": "noop", "arguments": {}}]\n')
    assert out.content is None and calls_of(out) == [("noop", "{}")]
    assert make_tool_parser("json_array", TOOLS).parse('[{"name": "noop", "arguments": {}}] ok').tool_calls == []


# ---- held-back markers never leak -----------------------------------------------------------

@pytest.mark.parametrize("name,text,marker", [
    ("hermes", "ok " + '<tool_call>{"name": "noop", "arguments": {}}</tool_call>', "<"),
    ("llama3_json", '<|python_tag|>{"name": "noop", "parameters": {}}', "<"),
    ("json_array", '[{"name": "noop", "arguments": {}}]', "["),
])
def test_markers_are_never_given_out_as_content(name: str, text: str, marker: str) -> None:
    for i in range(len(text) + 1):
        for chunks in ([text[:i], text[i:]], list(text)):
            deltas = run_stream(name, chunks)
            content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
            assert marker not in content and content in ("", "ok")


def test_random_mixed_outputs_stream_like_they_parse() -> None:
    rnd = random.Random(3)
    pieces = ["Hello ", "\n", "  ", "<tool", "<tool_call>", "</tool_call>", hermes_call("search", {"q": "é\n"}),
              hermes_call("noop", {}), '{"name": "search"', "}", "<|python_tag|>", ";", "[", "]", ",",
              '{"name": "noop", "arguments": {}}', '{"name": "search", "parameters": {"a": [1]}}', "text"]
    for i in range(300):
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 6)))
        for name in ("hermes", "llama3_json"):
            assert_stream_matches(name, text, seed=i, every_split=False)


# ---- registry and auto-detection ------------------------------------------------------------

def test_registry_names_and_unknown_name() -> None:
    for name in ("hermes", "llama3_json", "json_array"):
        assert get_tool_parser(name).name == name
    with pytest.raises(UnknownToolParser, match="unknown tool-call parser 'mistral'.*hermes"):
        get_tool_parser("mistral")
    with pytest.raises(ValueError):
        make_tool_parser(None)  # type: ignore[arg-type]
    with pytest.raises(UnknownToolParser):
        resolve_parser_name("bogus", "<tool_call>")
    assert resolve_parser_name("json_array", None) == "json_array"


QWEN_TEMPLATE = ("{%- if tools %}<|im_start|>system\n# Tools\n<tools>{{ tools }}</tools>\nFor each function call, "
                 "return a json object within <tool_call></tool_call> XML tags{%- endif %}")
LLAMA31_TEMPLATE = ("<|start_header_id|>ipython<|end_header_id|>{{- '<|python_tag|>' + tool_call.name }}"
                    'Respond in the format {"name": function name, "parameters": dictionary of argument name}')
LLAMA32_TEMPLATE = ('<|start_header_id|>system<|end_header_id|>Respond in the format {"name": function name, '
                    '"parameters": dictionary}<|eot_id|>')
LLAMA_IPYTHON = "{% if message.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>{% endif %}"


def test_default_parser_for_templates() -> None:
    assert default_parser_for(QWEN_TEMPLATE, "qwen2") == "hermes"
    assert default_parser_for(LLAMA31_TEMPLATE, "llama") == "llama3_json"
    assert default_parser_for(LLAMA32_TEMPLATE, "llama") == "llama3_json"
    assert default_parser_for(LLAMA_IPYTHON, "llama") == "llama3_json"
    assert default_parser_for(LLAMA_IPYTHON, "mistral") is None
    assert default_parser_for("{{ messages }}<|im_start|>", "llama") is None
    assert default_parser_for(None, "llama") is None
    assert resolve_parser_name("auto", QWEN_TEMPLATE) == "hermes"
    assert resolve_parser_name(None, LLAMA31_TEMPLATE) == "llama3_json"


def test_feed_after_finish_is_refused() -> None:
    s = make_tool_parser("hermes", TOOLS).stream()
    assert s.finish() == [] and s.finish() == []
    with pytest.raises(RuntimeError):
        s.feed("x")
