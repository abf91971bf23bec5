"""Function calling helpers (runtime/tool_calls.py): parsing Qwen/Hermes <tool_call> blocks,
whole and streamed, validating OpenAI `tools` / `tool_choice`, and rendering prompts."""

from __future__ import annotations

import json
import random

import pytest

from arle_runtime.chat import ChatTemplate
from arle_runtime.errors import ArleError
from arle_runtime.tool_calls import (
    ToolCallStream,
    messages_with_tools_prompt,
    parse_tool_calls,
    template_handles_tools,
    validate_tool_choice,
    validate_tools,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def _calls(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_one_call_has_no_content():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content is None
    assert _calls(calls) == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_") and calls[0].to_openai()["type"] == "function"


def test_several_calls_in_order_with_distinct_ids():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content is None
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls[0].id != calls[1].id


def test_text_before_the_call_is_content():
    content, calls = parse_tool_calls('Let me check.\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n')
    assert content == "Let me check."
    assert _calls(calls) == [("get_time", {})]


def test_malformed_json_inside_tags_stays_content():
    text = 'Sure: <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    assert parse_tool_calls(text) == (text, [])
    no_name = '<tool_call>{"arguments": {}}</tool_call>'
    assert parse_tool_calls(no_name) == (no_name, [])


def test_unclosed_call_stays_content():
    text = 'Hi <tool_call>\n{"name": "get_time", "argu'
    assert parse_tool_calls(text) == (text, [])


def test_plain_text_is_untouched():
    for text in ("", "Paris is sunny.  ", "a < b and <tool is not a tag\n", "<tool_cal"):
        assert parse_tool_calls(text) == (text, [])


def test_a_list_in_one_block_is_several_calls():
    _, calls = parse_tool_calls('<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"a": 1}}]</tool_call>')
    assert _calls(calls) == [("f", {}), ("g", {"a": 1})]
    assert parse_tool_calls("<tool_call>[]</tool_call>") == ("<tool_call>[]</tool_call>", [])


def test_string_arguments_and_parameters_key_are_accepted():
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
                                '<tool_call>{"name": "g", "parameters": {"y": 2}}</tool_call>')
    assert _calls(calls) == [("f", {"x": 1}), ("g", {"y": 2})]


@pytest.mark.parametrize("text", [
    TWO_CALLS,
    "Let me check. " + TWO_CALLS + " Done.",
    'x <tool_call>{"name": 1}</tool_call> y <tool_call>{"name": "f", "arguments": {}}</tool_call>',
    "no calls at all, just < and <tool and spaces   ",
    'cut off <tool_call>{"name": "f", "ar',
])
def test_streamed_deltas_give_the_same_answer(text):
    content, calls = parse_tool_calls(text)
    rng = random.Random(0)
    for _ in range(20):
        stream, shown, got = ToolCallStream(), [], []
        i = 0
        while i < len(text):
            n = rng.randint(1, 6)
            piece, more = stream.feed(text[i:i + n])
            shown.append(piece)
            got += more
            i += n
        rest, more = stream.finish()
        shown.append(rest)
        got += more
        assert "".join(shown) == (content or "")
        assert _calls(got) == _calls(calls)


def test_validate_tools_accepts_openai_shape():
    assert validate_tools(None) == []
    assert validate_tools([WEATHER, TIME]) == [WEATHER, TIME]


@pytest.mark.parametrize("tools, param", [
    ({"type": "function"}, "tools"),
    (["get_weather"], "tools[0]"),
    ([{"type": "retrieval", "function": {"name": "x"}}], "tools[0].type"),
    ([{"type": "function"}], "tools[0].function"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], "tools[0].function.parameters"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
])
def test_invalid_tools_name_the_param(tools, param):
    with pytest.raises(ArleError) as e:
        validate_tools(tools)
    assert e.value.param == param


def test_tool_choice():
    tools = [WEATHER, TIME]
    assert validate_tool_choice(None, tools).mode == "auto"
    assert validate_tool_choice(None, []).mode == "none"
    assert validate_tool_choice("none", tools).tools_to_show(tools) == []
    assert validate_tool_choice("auto", tools).tools_to_show(tools) == tools
    named = validate_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools)
    assert named.tools_to_show(tools) == [TIME]
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}, {"function": "x"}, 3):
        with pytest.raises(ArleError) as e:
            validate_tool_choice(bad, tools)
        assert e.value.param == "tool_choice"


SMOL = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWENISH = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
           "{% for m in messages %}{{ m.role }}:{{ m.content }}"
           "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}\n"
           "{% endfor %}")

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
]


def test_template_without_tools_gets_a_hermes_system_section():
    assert not template_handles_tools(SMOL) and template_handles_tools(QWENISH)
    text = ChatTemplate(SMOL, None, None).render(HISTORY, tools=[WEATHER])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in system and "<tool_call>" in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n12:00\n</tool_response>" \
        in text
    assert "<|im_start|>tool" not in text


def test_tools_join_an_existing_system_message():
    out = messages_with_tools_prompt([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"}], [TIME])
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and len(out) == 2


def test_template_with_tools_renders_them_itself():
    text = ChatTemplate(QWENISH, None, None).render(HISTORY, tools=[WEATHER])
    assert text.startswith("TOOLS:get_weather;user:")
    assert '[get_weather {"city": "Paris"}]' in text  # arguments handed over as an object
    assert "# Tools" not in text
