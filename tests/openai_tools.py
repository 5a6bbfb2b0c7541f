"""Function calling through the real `openai` Python client against `hayloft serve` on Qwen2.5-Coder-0.5B (run by
tests/serve.rs: qwen25_calls_tools_over_http).

Usage: python openai_tools.py BASE_URL
"""

import json
import sys

import openai

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Adds two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
]


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
    question = [{"role": "user", "content": "What's the weather like in Paris right now?"}]

    # A call, parsed into the client's own types.
    r = client.chat.completions.create(model="any", messages=question, tools=TOOLS, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", r
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, r
    assert calls[0].type == "function" and calls[0].function.name == "get_weather", calls
    assert json.loads(calls[0].function.arguments)["city"] == "Paris", calls

    # Streamed: the deltas put together the way clients do (by index) give the same call.
    parts: dict[int, dict] = {}
    finish = None
    for ch in client.chat.completions.create(model="any", messages=question, tools=TOOLS, temperature=0,
                                             max_tokens=60, stream=True):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        assert not d.content, f"a call's text leaked into content: {d.content!r}"
        for tc in d.tool_calls or []:
            p = parts.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            p["id"] = p["id"] or tc.id
            p["name"] += tc.function.name or ""
            p["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    assert finish == "tool_calls", finish
    assert [p["name"] for p in parts.values()] == ["get_weather"], parts
    assert json.loads(parts[0]["arguments"]) == json.loads(calls[0].function.arguments), parts

    # The client's own message object goes back with the tool's result (its null fields and all).
    follow = question + [choice.message, {"role": "tool", "tool_call_id": calls[0].id,
                                          "content": json.dumps({"temperature": 18, "sky": "light rain"})}]
    r2 = client.chat.completions.create(model="any", messages=follow, tools=TOOLS, temperature=0, max_tokens=1)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 20, (r2.usage, r.usage)

    # A named function: its call, finished with "stop".
    r3 = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "What is 2 + 3.5?"}],
                                        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
                                        temperature=0, max_tokens=60)
    c3 = r3.choices[0]
    assert c3.finish_reason == "stop" and c3.message.tool_calls[0].function.name == "add", r3
    args = json.loads(c3.message.tool_calls[0].function.arguments)
    assert isinstance(args["a"], (int, float)) and isinstance(args["b"], (int, float)), args

    # A template error surfaces as the client's BadRequestError.
    try:
        client.chat.completions.create(model="any", messages=question, tools=[{"type": "retrieval"}])
        raise AssertionError("a malformed tool was accepted")
    except openai.BadRequestError as e:
        assert "tools[0]" in str(e), e
    print("all checks passed")


if __name__ == "__main__":
    main()
