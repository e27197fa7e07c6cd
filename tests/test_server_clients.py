"""The server as chat clients use it, through the clients people use (each a pinned pip package,
against a real running server: no mocks): the thinking as `reasoning_content`, streaming that
shows progress before the answer, `n`, and `/v1/completions` for raw prompts."""

from __future__ import annotations

import openai
import pytest
from server_process import ServerProcess

from edge_metastone.options import ReasonOptions
from edge_metastone.server.progress import split_thinking

QUESTION = [{"role": "user", "content": "What is (17+25)*3-40?"}]
RAW = "<|im_start|>user\nWhat is 12+7*3?<|im_end|>\n<|im_start|>assistant\n<think>\n"


def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_chat_returns_the_chosen_thought_as_reasoning_content(nano, nano_api):
    resp = oai(nano).chat.completions.create(
        model="default", messages=QUESTION, seed=3, n=2, extra_body={"effort": "low"}
    )
    direct = nano_api.reason(QUESTION, ReasonOptions(effort="low", seed=3))
    chosen = direct.chosen_candidate
    thought, answer = split_thinking(chosen.text, True)
    msg = resp.choices[0].message
    assert msg.content == answer and "\\boxed{" in answer and "</think>" not in answer
    assert msg.model_extra["reasoning_content"] == thought and "=" in thought
    assert "<think>" not in thought and "</think>" not in thought
    # the other choice: the other candidate, with its own thought
    other = direct.candidates[1 - direct.chosen]
    assert (
        resp.choices[1].message.model_extra["reasoning_content"]
        == split_thinking(other.text, True)[0]
    )
    assert resp.choices[1].model_extra["metastone"]["candidate"] == other.index


def test_a_stream_shows_progress_first_and_ends_with_the_chosen_thought(nano, nano_api):
    stream = oai(nano).chat.completions.create(
        model="default", messages=QUESTION, seed=5, stream=True, extra_body={"effort": "medium"}
    )
    order, reasoning, content = [], "", ""
    for chunk in stream:
        ext = (chunk.model_extra or {}).get("metastone") or {}
        if any(ev["type"] == "finish" for ev in ext.get("events", [])):
            order.append("finish event")
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = (delta.model_extra or {}).get("reasoning_content")
        if piece:
            order.append("reasoning")
            reasoning += piece
        if delta.content:
            order.append("content")
            content += delta.content
    direct = nano_api.reason(QUESTION, ReasonOptions(effort="medium", seed=5))
    thought, answer = split_thinking(direct.chosen_candidate.text, True)
    # something readable came before any candidate had finished, and the answer came last
    assert order[0] == "reasoning" and order[-1] == "content" and content == answer
    lines = reasoning.splitlines()
    assert lines[0].startswith("Thinking with several candidates at once (effort medium)")
    finished = [ln for ln in lines if ln.startswith("Candidate ") and " finished " in ln]
    assert len(finished) == direct.k
    assert all(f"answer '{c.answer}'" in "\n".join(finished) for c in direct.candidates)
    assert f"Chosen: candidate {direct.chosen} " in reasoning
    assert reasoning.endswith(thought)


def test_text_completions_feed_the_raw_prompt(nano, nano_api):
    c = oai(nano)
    resp = c.completions.create(
        model="default", prompt=RAW, max_tokens=64, seed=9, n=2, extra_body={"effort": "low"}
    )
    direct = nano_api.reason(RAW, ReasonOptions(effort="low", seed=9, max_new_tokens=64, raw=True))
    assert resp.object == "text_completion" and len(resp.choices) == 2
    assert (
        resp.choices[0].text == direct.chosen_candidate.text and "</think>" in resp.choices[0].text
    )
    ext = resp.model_extra["metastone"]
    assert ext["prompt_text"] == RAW and ext["warnings"] == []
    assert [x["token_ids"] for x in ext["candidates"]] == [x.token_ids for x in direct.candidates]
    assert resp.usage.completion_tokens == sum(x.tokens for x in direct.candidates)
    assert resp.choices[0].finish_reason == "stop"
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="default",
            prompt=RAW,
            max_tokens=64,
            seed=9,
            stream=True,
            extra_body={"effort": "low"},
        )
        if ch.choices
    )
    assert text == direct.chosen_candidate.text
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.completions.create(model="default", prompt=RAW, echo=True)
    with pytest.raises(openai.BadRequestError, match="one prompt"):
        c.completions.create(model="default", prompt=[RAW, RAW])


def test_litellm_completion_surfaces_reasoning_content(nano, nano_api):
    """LiteLLM's `completion()` pointed at the server, as its docs say for an OpenAI-compatible
    one (`openai/` prefix, `api_base`): the thinking reaches `message.reasoning_content`."""
    import os

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # its bundled copy: no download at import
    import litellm

    ask = {
        "model": "openai/default",
        "api_base": nano.url + "/v1",
        "api_key": "unused",
        "messages": QUESTION,
        "seed": 3,
        "temperature": 0.6,
        "extra_body": {"effort": "low"},
    }
    resp = litellm.completion(**ask)
    direct = nano_api.reason(QUESTION, ReasonOptions(effort="low", seed=3, temperature=0.6))
    thought, answer = split_thinking(direct.chosen_candidate.text, True)
    msg = resp.choices[0].message
    assert msg.content == answer and msg.reasoning_content == thought
    chunks = litellm.completion(**ask, stream=True)
    content, reasoning = "", ""
    for ch in chunks:
        d = ch.choices[0].delta
        content += d.content or ""
        reasoning += getattr(d, "reasoning_content", None) or ""
    assert content == answer and reasoning.endswith(thought)
    assert reasoning.startswith("Thinking with several candidates")


def test_langchain_chat_openai_invoke_and_stream(nano, nano_api):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="default",
        base_url=nano.url + "/v1",
        api_key="unused",
        seed=3,
        temperature=0.6,
        max_retries=0,
        extra_body={"effort": "low"},
    )
    direct = nano_api.reason(QUESTION, ReasonOptions(effort="low", seed=3, temperature=0.6))
    _, answer = split_thinking(direct.chosen_candidate.text, True)
    out = llm.invoke(QUESTION)
    assert out.content == answer
    assert "".join(ch.content for ch in llm.stream(QUESTION)) == answer
