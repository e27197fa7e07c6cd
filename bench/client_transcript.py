"""What a person sees of `edge-metastone serve` through the clients people use: openai, LiteLLM
and LangChain, each not streamed and streamed, on the embedded model (an in-task question, and an
off-task one with its warning). Prints one line per call; not a benchmark.

    LITELLM_LOCAL_MODEL_COST_MAP=True python bench/client_transcript.py > transcript.txt
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

PORT = 18431
BASE = f"http://127.0.0.1:{PORT}/v1"
QUESTION = "What is (17+25)*3-40?"
OFF_TASK = "What is the capital of France?"


def _wait_ready() -> None:
    for _ in range(300):
        try:
            if httpx.get(BASE.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not come up")


def _openai() -> None:
    from openai import OpenAI

    c = OpenAI(base_url=BASE, api_key="none")
    card = c.models.list().data[0]
    print(
        f"== openai models.list: {card.id}; strategies {sorted(card.model_extra['metastone']['strategies'])}"
    )
    msgs = [{"role": "user", "content": QUESTION}]
    r = c.chat.completions.create(
        model=card.id, messages=msgs, seed=0, extra_body={"effort": "medium"}
    )
    m, x = r.choices[0].message, r.model_extra["metastone"]
    thought = (m.model_extra or {}).get("reasoning_content", "")
    print(
        f"== openai, not streamed: content {m.content!r}; reasoning_content {thought!r}; "
        f"k {x['k']}, strategy {x['strategy']}, warnings {x['warnings']}"
    )
    off = [{"role": "user", "content": OFF_TASK}]
    r = c.chat.completions.create(model=card.id, messages=off, seed=0, extra_body={"effort": "low"})
    print(
        f"== openai, off-task: content {r.choices[0].message.content!r}; "
        f"warnings {r.model_extra['metastone']['warnings']}"
    )
    content, thinking = [], []
    stream = c.chat.completions.create(
        model=card.id, messages=msgs, seed=0, stream=True, extra_body={"effort": "low"}
    )
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            thinking.append((delta.model_extra or {}).get("reasoning_content") or "")
    said = [t for t in thinking if t]
    print(
        f"== openai, streamed: content {''.join(content)!r}; {len(said)} reasoning_content "
        f"chunks, the first {said[0][:70] if said else None!r}"
    )


def _litellm() -> None:
    import litellm

    ask = {"model": "openai/default", "api_base": BASE, "api_key": "none", "seed": 0}
    msgs = [{"role": "user", "content": QUESTION}]
    r = litellm.completion(messages=msgs, **ask)
    print(f"== LiteLLM, not streamed: {r.choices[0].message.content!r}")
    chunks = litellm.completion(messages=msgs, stream=True, **ask)
    print(f"== LiteLLM, streamed: {''.join(c.choices[0].delta.content or '' for c in chunks)!r}")


def _langchain() -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=BASE, api_key="none", model="default", seed=0)
    print(f"== LangChain, invoke: {llm.invoke(QUESTION).content!r}")
    print(f"== LangChain, stream: {''.join(c.content for c in llm.stream(QUESTION))!r}")


def main() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "edge_metastone", "serve", "--port", str(PORT), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready()
        _openai()
        _litellm()
        _langchain()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
