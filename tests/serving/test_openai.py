"""The unmodified `openai` client against the OpenAI-compatible HTTP routes."""

from __future__ import annotations

import pytest

from .conftest import Cluster

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(cluster: Cluster):
    return openai.OpenAI(base_url=cluster.http_base, api_key="unused", max_retries=0)


def test_models(client, cluster: Cluster) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [cluster.model_dir.name]


def test_completion(client, cluster: Cluster) -> None:
    model = cluster.model_dir.name
    r = client.completions.create(model=model, prompt="hello", max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == model
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 7 and r.usage.prompt_tokens > 0
    # Same request streamed: same text, in chunks. (How many depends on timing: tokens the engine
    # makes before the stream's consumer runs again are merged into one message, by design; on
    # 2 busy cores all 7 can arrive at once.)
    chunks = list(
        client.completions.create(
            model=model, prompt="hello", max_tokens=7, temperature=0, stream=True
        )
    )
    assert 1 <= len(chunks) <= r.usage.completion_tokens + 1
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_completion_token_ids_prompt_and_usage_chunk(client, cluster: Cluster) -> None:
    chunks = list(
        client.completions.create(
            model=cluster.model_dir.name,
            prompt=[5, 6, 7],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 5


def test_chat(client, cluster: Cluster) -> None:
    model = cluster.model_dir.name
    msgs = [{"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    stream = list(
        client.chat.completions.create(
            model=model, messages=msgs, max_tokens=6, temperature=0, stream=True
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == r.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"top_p": 2}, "top_p"),
        ({"n": 2}, "n"),
    ],
)
def test_errors_are_openai_shaped(client, cluster: Cluster, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=cluster.model_dir.name, prompt="x", **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert param in e.value.body["message"]


def test_unknown_model_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"
