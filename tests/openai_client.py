"""Drives `hayloft serve` with the real `openai` Python client (run by tests/serve.rs: openai_python_client).

Usage: python openai_client.py BASE_URL API_KEY
"""

import json
import sys
from typing import Literal

import openai
import pydantic


class Reading(pydantic.BaseModel):
    """A structured-output type: the client sends its JSON Schema (strict) and parses the answer into it."""

    ok: bool
    count: int
    unit: Literal["m", "s"] | None  # no free string: a random model's string need not end


def main() -> None:
    base, key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)

    models = client.models.list()
    assert len(models.data) == 1, models

    c = client.completions.create(model="any", prompt="the hen", max_tokens=5, temperature=0)
    assert isinstance(c.choices[0].text, str), c
    assert c.choices[0].finish_reason in ("stop", "length"), c
    assert c.usage.prompt_tokens > 0 and c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    # lm-eval's log-likelihood request shape.
    e = client.completions.create(model="any", prompt=[[17, 200, 33, 90]], max_tokens=1, temperature=0,
                                  logprobs=1, echo=True, seed=1234)
    lp = e.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == 5, lp
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:]), lp

    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].message.role == "assistant", chat
    assert isinstance(chat.choices[0].message.content, str)

    # Streaming, with the usage chunk at the end.
    text, usage = "", None
    stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert usage is not None and usage.completion_tokens >= 1, usage
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)

    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="any", prompt="the hen", max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

    # Structured outputs: a schema by hand, then the client's own from a pydantic model (keys in the model's order).
    # The random model may fill every whitespace run the grammar allows (32 bytes): room for that in max_tokens.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    s = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=400, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": schema}})
    assert s.choices[0].finish_reason == "stop", s
    v = json.loads(s.choices[0].message.content)
    assert set(v) == {"ok", "n"} and isinstance(v["ok"], bool) and isinstance(v["n"], int), v
    try:
        parsed = client.chat.completions.parse(model="any", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=460, temperature=0, response_format=Reading)
    except openai.LengthFinishReasonError as err:
        raise AssertionError(f"no whole value in 460 tokens: {err.completion.choices[0].message.content!r}")
    r = parsed.choices[0].message.parsed
    assert isinstance(r, Reading), parsed
    content = parsed.choices[0].message.content
    assert content.index('"ok"') < content.index('"count"') < content.index('"unit"'), content
    o = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=400,
                                       temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(o.choices[0].message.content), dict), o

    # vLLM's sampling extras through extra_body: a bias forces token 120 ('x'), which is a stop token, held off by
    # min_tokens for 3 draws.
    m = client.completions.create(model="any", prompt=[[5, 6, 7]], max_tokens=10, temperature=0,
                                  logit_bias={"120": 100},
                                  extra_body={"stop_token_ids": [120], "min_tokens": 3, "ignore_eos": True})
    assert m.choices[0].finish_reason == "stop" and m.usage.completion_tokens == 4, m
    assert m.choices[0].text.endswith("x") and "x" not in m.choices[0].text[:-1], m

    # Errors arrive as the client's exceptions.
    try:
        client.completions.create(model="any", prompt="x", max_tokens=1, extra_body={"kv": "nosuch@1"})
        raise AssertionError("a bad kv method was accepted")
    except openai.BadRequestError as err:
        assert "nosuch" in str(err), err
    try:
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong API key was accepted")
    except openai.AuthenticationError:
        pass
    print("all checks passed")


if __name__ == "__main__":
    main()
