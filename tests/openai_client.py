"""Drives `hayloft serve` with the real `openai` Python client (run by tests/serve.rs: openai_python_client).

Usage: python openai_client.py BASE_URL API_KEY
"""

import sys

import openai


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
