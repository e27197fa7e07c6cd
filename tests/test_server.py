"""`edge-metastone serve` through real HTTP: the official `openai` client, concurrency, disconnects,
a full queue, every error status and shutdown with requests in flight (uvicorn in a subprocess)."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import defaultdict

import httpx
import openai
import pytest
from server_process import ServerProcess
from starlette.testclient import TestClient

from edge_metastone.models import default_model_path
from edge_metastone.options import ReasonOptions
from edge_metastone.reasoner import Reasoner
from edge_metastone.server.app import create_app
from edge_metastone.server.errors import ErrorGuard
from edge_metastone.server.progress import split_thinking

USER = [{"role": "user", "content": "What is 2+3?"}]
# ~40 s on the tiny fixture: greedy after "Go on." never ends its turn within 4,000 tokens (checked
# by test_long_request_really_runs_to_its_limit: the queueing tests below depend on it)
GO_ON = [{"role": "user", "content": "Go on."}]
LONG = {"messages": GO_ON, "effort": "medium", "temperature": 0.0, "max_tokens": 4000}


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    """The random fixture model, one request at a time (`--parallel 1`) behind a queue of one, so
    a full queue is easy to reach (the nano server below runs requests together)."""
    with ServerProcess(
        "--model",
        str(tiny_gguf("q8_0")),
        "--parallel",
        "1",
        "--max-queue",
        "1",
        "--max-request-bytes",
        "65536",
    ) as server:
        yield server
        assert server.stop() == 0
        assert "Traceback" not in server.stderr, server.stderr


def said(c) -> tuple[str | None, str]:
    """(reasoning_content, content) a chat choice carries for candidate `c` of the Python API."""
    return split_thinking(c.text, True)


def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server: ServerProcess, body, timeout: float = 60) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.url + "/v1/chat/completions",
        content=data,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


def test_openai_client_non_streaming_matches_the_python_api(tiny, tiny_gguf):
    c = client(tiny)
    assert [m.id for m in c.models.list().data] == ["tiny-q8_0"]
    resp = c.chat.completions.create(
        model="tiny-q8_0",
        messages=USER,
        max_tokens=40,
        seed=7,
        temperature=1.0,
        top_p=0.9,
        extra_body={"effort": "low"},
    )
    opts = ReasonOptions(effort="low", seed=7, max_new_tokens=40, temperature=1.0, top_p=0.9)
    with Reasoner(tiny_gguf("q8_0")) as r:
        direct = r.reason(USER, opts)
    ext = resp.model_extra["metastone"]
    assert [c["token_ids"] for c in ext["candidates"]] == [c.token_ids for c in direct.candidates]
    assert ext["chosen"] == direct.chosen and ext["k"] == 2 and ext["seed"] == 7
    thought, answer = said(direct.chosen_candidate)
    assert resp.choices[0].message.content == answer
    assert resp.choices[0].message.model_extra["reasoning_content"] == thought
    assert ext["answer"] == direct.answer
    assert resp.choices[0].finish_reason == (
        "length" if direct.chosen_candidate.truncated else "stop"
    )
    assert resp.usage.completion_tokens == sum(c.tokens for c in direct.candidates)
    assert resp.usage.prompt_tokens == direct.timings["prompt_tokens"] > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert (ext["timings"]["kv_layout"], ext["timings"]["kv_type"]) == ("streams", "f16")
    q8 = c.chat.completions.create(
        model="tiny-q8_0",
        messages=USER,
        max_tokens=8,
        extra_body={"effort": "low", "kv_cache": "q8_0"},
    )
    assert q8.model_extra["metastone"]["timings"]["kv_type"] == "q8_0"


def read_stream(stream) -> dict:
    """Everything a streamed completion carried: content, candidates' texts and step events."""
    out = {"content": "", "texts": defaultdict(str), "steps": defaultdict(list), "finish": None}
    out["reasoning"] = []  # each reasoning_content delta, with the time it came
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            out["content"] += delta.content or ""
            if (delta.model_extra or {}).get("reasoning_content"):
                out["reasoning"].append((time.monotonic(), delta.model_extra["reasoning_content"]))
            out["finish"] = chunk.choices[0].finish_reason or out["finish"]
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        ext = (chunk.model_extra or {}).get("metastone") or {}
        for ev in ext.get("events", []):
            if ev["type"] in ("token", "finish"):
                out["texts"][ev["candidate"]] += ev["text"]
            else:
                out["steps"][ev["candidate"]].append((ev["score"], ev["running_score"]))
        if "result" in ext:
            out["result"] = ext["result"]
    return out


def test_openai_client_streaming_rebuilds_every_candidate(nano, nano_api):
    prompt = [{"role": "user", "content": "What is (17+25)*3-40?"}]
    stream = client(nano).chat.completions.create(
        model="default",
        messages=prompt,
        seed=11,
        temperature=1.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"effort": "low"},
    )
    got = read_stream(stream)
    direct = nano_api.reason(prompt, ReasonOptions(effort="low", seed=11, temperature=1.0))
    assert got["content"] == said(direct.chosen_candidate)[1] and direct.answer
    assert got["result"]["chosen"] == direct.chosen
    assert got["finish"] == "stop"
    assert got["usage"].completion_tokens == sum(c.tokens for c in direct.candidates)
    for c in direct.candidates:
        assert got["texts"][c.index] == c.text
        scores = [s for s, _ in got["steps"][c.index]]
        assert scores == pytest.approx(c.step_scores) and scores
        assert got["steps"][c.index][-1][1] == pytest.approx(c.score)  # running score at the end


def test_eight_concurrent_clients_each_get_their_own_result(nano, nano_api):
    problems = [
        (f"What is {a}+{b}*{c}?", seed)
        for seed, (a, b, c) in enumerate(
            [
                (3, 4, 5),
                (12, 7, 2),
                (9, 9, 9),
                (41, 3, 6),
                (5, 15, 4),
                (60, 2, 8),
                (7, 11, 3),
                (2, 25, 2),
            ]
        )
    ]
    post(nano, {"messages": USER, "effort": "low", "seed": 0})  # warm: the baseline memory
    base_kb = nano.status_kb("VmHWM")
    barrier = threading.Barrier(len(problems))
    results: dict[int, dict] = {}

    def ask(i: int) -> None:
        prompt, seed = problems[i]
        c = client(nano)
        barrier.wait()
        kw = {"model": "default", "messages": [{"role": "user", "content": prompt}], "seed": seed}
        if i % 2:  # half stream, half don't
            got = read_stream(c.chat.completions.create(**kw, stream=True))
            results[i] = {"content": got["content"], "ext": got["result"]}
        else:
            resp = c.chat.completions.create(**kw)
            results[i] = {
                "content": resp.choices[0].message.content,
                "ext": resp.model_extra["metastone"],
            }

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(len(problems)))
    for i, (prompt, seed) in enumerate(problems):
        direct = nano_api.reason(prompt, ReasonOptions(seed=seed))
        got = results[i]
        assert prompt in got["ext"]["prompt_text"]
        answer = said(direct.chosen_candidate)[1]
        assert got["content"] == answer, (prompt, got["content"], answer)
        assert [c["token_ids"] for c in got["ext"]["candidates"]] == [
            c.token_ids for c in direct.candidates
        ]
    assert len({r["ext"]["prompt_text"] for r in results.values()}) == len(problems)
    # the 8 requests were in flight together in one shared context (up to 8 x 8 sequences), not 8
    # contexts: its KV cells (64 streams of 256 cells, under 20 MiB for this model) and compute
    # buffers. They decoded together, or waited for room: the batch governor holds requests back
    # once it has measured that more rows decode no faster (the embedded model on a CPU)
    assert any(
        r["ext"]["timings"]["shared_rounds"] or r["ext"]["timings"]["queue_s"] > 0.01  # µs alone
        for r in results.values()
    )
    grown_mib = (nano.status_kb("VmHWM") - base_kb) / 1024
    assert grown_mib < 160, f"peak memory grew {grown_mib:.0f} MiB"
    assert nano.health()["served"] >= 1 + len(problems)


def first_event(lines) -> None:
    for line in lines:
        if line.startswith("data: ") and '"events"' in line:
            return
    raise AssertionError("the stream ended before its first event")


def assert_generation_stopped(server: ServerProcess, before: dict) -> dict:
    h = server.wait_for(lambda h: not h["running"] and h["cancelled"] > before["cancelled"], 5)
    cpu = server.cpu_s()
    time.sleep(0.5)
    assert server.cpu_s() - cpu < 0.15, "the server kept computing after the cancel"
    assert server.health()["generated_tokens"] == h["generated_tokens"]
    return h


def test_client_disconnect_mid_stream_cancels_the_generation(tiny):
    before = tiny.health()
    with httpx.stream(
        "POST",
        tiny.url + "/v1/chat/completions",
        json={**LONG, "stream": True},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the connection itself
        first_event(lines)
        time.sleep(0.3)
        assert tiny.health()["running"]
    t0 = time.monotonic()
    h = assert_generation_stopped(tiny, before)
    assert time.monotonic() - t0 < 2.0
    made = h["generated_tokens"] - before["generated_tokens"]
    assert 0 < made < 8 * 4000 // 4, made  # stopped far short of the 32,000 tokens asked for
    r = post(tiny, {"messages": USER, "effort": "low", "max_tokens": 8, "seed": 1})
    assert r.status_code == 200  # the model is free again


def test_client_disconnect_while_waiting_cancels_too(tiny):
    before = tiny.health()
    with pytest.raises(httpx.ReadTimeout):
        post(tiny, LONG, timeout=0.8)  # not streaming: gives up waiting
    assert_generation_stopped(tiny, before)


def test_full_queue_is_503_with_retry_after_and_a_queued_client_can_leave(tiny):
    before = tiny.health()
    with httpx.stream(
        "POST", tiny.url + "/v1/chat/completions", json={**LONG, "stream": True}
    ) as running:
        lines = running.iter_lines()
        first_event(lines)
        gave_up: list[type] = []

        def wait_then_leave() -> None:
            try:
                post(tiny, LONG, timeout=1.5)
            except httpx.ReadTimeout as e:
                gave_up.append(type(e))

        waiting = threading.Thread(target=wait_then_leave)
        waiting.start()
        tiny.wait_for(lambda h: h["queued"] == 1)
        r = post(tiny, {"messages": USER, "effort": "low", "max_tokens": 4})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.APIStatusError) as e:
            client(tiny).chat.completions.create(model="tiny-q8_0", messages=USER, max_tokens=4)
        assert e.value.status_code == 503
        waiting.join()
        assert gave_up == [httpx.ReadTimeout]
        h = tiny.wait_for(lambda h: h["queued"] == 0)  # the client that left, left the queue
        assert h["running"] and h["rejected"] == before["rejected"] + 2
    assert_generation_stopped(tiny, before)


def long_prompt(n_words: int) -> list[dict]:
    return [{"role": "user", "content": "number " * n_words}]


ERRORS = [
    # (body, status, param or code)
    (b"{", 400, "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": USER, "effort": "extreme"}, 400, "effort"),
    ({"messages": USER, "strategy": "magic"}, 400, "strategy"),
    ({"messages": USER, "temperature": -1}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "seed": -1}, 400, "seed"),
    ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": 5000}, 400, "max_tokens"),
    ({"messages": USER, "latency_budget": -1}, 400, "latency_budget"),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "latency_budget": 1e999}',
        400,
        "latency_budget",
    ),
    ({"messages": USER, "memory_budget": "lots"}, 400, "memory_budget"),
    ({"messages": USER, "effort": "auto", "memory_budget": 1e308}, 400, "memory_budget"),
    ({"messages": USER, "kv_cache": "q2_k"}, 400, "kv_cache"),
    ({"messages": USER, "stop": [""]}, 400, "stop"),
    ({"messages": USER, "n": 9}, 400, "n"),  # medium generates 8
    ({"messages": USER, "n": 3, "effort": "low"}, 400, "n"),
    ({"messages": USER, "n": 3, "effort": "auto"}, 400, "n"),  # auto may run low (2)
    ({"messages": USER, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": USER, "effort": "auto", "latency_budget": 1e-3}, 400, "budget_cannot_be_met"),
    ({"messages": long_prompt(5000), "max_tokens": 64}, 400, "context_length_exceeded"),
    (
        {"messages": [{"role": "user", "content": "\ud800 lone surrogate"}], "max_tokens": 4},
        400,
        None,
    ),
    ({"messages": USER, "model": "gpt-4o"}, 404, "model_not_found"),
    ({"messages": long_prompt(20000)}, 413, "request_too_large"),
]


@pytest.mark.parametrize(("body", "status", "where"), ERRORS)
def test_errors_are_openai_error_bodies(tiny, body, status, where):
    r = post(tiny, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert where is None or where in (err["param"], err["code"]), err
    assert "Traceback" not in r.text


def test_errors_through_the_openai_client_and_other_routes(tiny):
    c = client(tiny)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny-q8_0", messages=USER, extra_body={"effort": "extreme"}
        )
    assert e.value.body["param"] == "effort"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4o")
    assert c.models.retrieve("tiny-q8_0").id == "tiny-q8_0"
    assert httpx.get(tiny.url + "/nope").json()["error"]["code"] == "not_found"
    r = httpx.get(tiny.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_closed_model_is_a_500_body_and_unexpected_errors_are_one_log_line(tiny_gguf, caplog):
    r = Reasoner(tiny_gguf("q8_0"))
    with TestClient(create_app(r), base_url="http://127.0.0.1") as http:
        r.close()  # the model is gone under the server: a server fault, not the request's
        resp = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"

    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="edge_metastone.server.errors")
    resp = TestClient(ErrorGuard(broken)).get("/")
    assert resp.status_code == 500
    assert resp.json()["error"] == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert [rec.getMessage() for rec in errors] == ["internal error: RuntimeError: boom"]
    assert errors[0].exc_info is None  # the traceback only at debug level


def test_shutdown_lets_requests_in_flight_finish(tiny_gguf):
    with ServerProcess("--model", str(tiny_gguf("q8_0")), "--shutdown-timeout", "20") as server:
        body = {"messages": GO_ON, "effort": "low", "temperature": 0.0, "max_tokens": 1500}
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(r=post(server, body)))
        t.start()
        server.wait_for(lambda h: h["running"])
        server.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert done["r"].status_code == 200
        assert [c["tokens"] for c in done["r"].json()["metastone"]["candidates"]] == [1500, 1500]
        assert server.proc.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            server.health()
    assert "stopped" in server.stdout and "Traceback" not in server.stderr


@pytest.mark.parametrize("second_signal", [False, True], ids=["grace-over", "second-ctrl-c"])
def test_shutdown_cancels_what_outlives_the_grace_time(tiny_gguf, second_signal):
    grace = "30" if second_signal else "0.5"
    with ServerProcess(
        "--model", str(tiny_gguf("q8_0")), "--shutdown-timeout", grace, "--parallel", "1"
    ) as server:
        queued: dict = {}
        with httpx.stream(
            "POST",
            server.url + "/v1/chat/completions",
            json={**LONG, "stream": True},
        ) as running:
            lines = running.iter_lines()
            first_event(lines)
            t = threading.Thread(target=lambda: queued.update(r=post(server, LONG)))
            t.start()
            server.wait_for(lambda h: h["queued"] == 1)
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            if second_signal:
                time.sleep(0.3)
                server.proc.send_signal(signal.SIGINT)
            tail = [line for line in lines if line.startswith("data: ")]
            t.join(30)
        assert server.proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
    assert json.loads(tail[-1][6:])["error"]["code"] == "shutting_down"  # the stream's last word
    assert queued["r"].status_code == 503
    assert queued["r"].json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in server.stderr, server.stderr


def test_serve_refuses_a_port_in_use_in_one_line(tiny, tiny_gguf):
    from conftest import run_cli

    proc = run_cli("serve", "--model", str(tiny_gguf("q8_0")), "--port", str(tiny.port), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "cannot listen" in proc.stderr, proc.stderr


def test_default_model_path_is_what_nano_serves(nano):
    card = httpx.get(nano.url + "/v1/models").json()["data"][0]
    assert card["metastone"]["file"] == default_model_path().name
    assert card["metastone"]["has_head"] and card["metastone"]["efforts"]["high"] == 32
    # how each selector chooses (the page reads it instead of knowing the names)
    how = card["metastone"]["strategies"]
    votes = {"vote", "weighted-vote", "confidence-vote", "combined-vote"}
    assert {name for name, h in how.items() if h["vote"]} == votes
    assert set(how) == votes | {"best-of-k", "prune", "logprob", "combined"}
    assert how["logprob"]["signal"] == "logprob" and how["best-of-k"]["signal"] == "sprm"
    assert how["vote"]["signal"] == "count" and how["combined-vote"]["signal"] == "combined"


def test_serve_without_max_new_tokens_uses_the_models_own_limit_and_warns_off_task():
    """`serve` with no --max-new-tokens gives a request without max_tokens the model's own limit
    (MetaStone-nano's 160, as `Reasoner()`), and an out-of-task prompt still gets an answer, with
    the warning `reason` prints, in `metastone.warnings` (whole and streamed)."""
    from edge_metastone.modelfile.about import model_max_new_tokens

    with ServerProcess() as server:
        card = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
        default = model_max_new_tokens(default_model_path())
        assert card["metastone"]["default_max_tokens"] == default == 160
        france = [{"role": "user", "content": "What is the capital of France?"}]
        off = post(server, {"messages": france, "effort": "low", "seed": 0}).json()
        [warning] = off["metastone"]["warnings"]
        assert "outside what MetaStone-nano can do" in warning
        assert "operands of one or two digits" in warning
        assert off["metastone"]["k"] == 2 and "content" in off["choices"][0]["message"]
        assert all(c["tokens"] <= default for c in off["metastone"]["candidates"])
        inside = [{"role": "user", "content": "What is (17+25)*3-40?"}]
        ok = post(server, {"messages": inside, "effort": "low", "seed": 0}).json()
        assert ok["metastone"]["warnings"] == []
        stream = client(server).chat.completions.create(
            model="default", messages=france, seed=0, stream=True, extra_body={"effort": "low"}
        )
        assert read_stream(stream)["result"]["warnings"] == [warning]
        assert server.stop() == 0
        assert "Traceback" not in server.stderr, server.stderr


def test_long_request_really_runs_to_its_limit(tiny_gguf):
    """The queueing and shutdown tests hold the server busy with LONG's prompt: greedy on it must
    not end its turn early (if a fixture change makes it, pick another prompt)."""
    with Reasoner(tiny_gguf("q8_0"), max_new_tokens=1500) as r:
        res = r.reason(GO_ON[0]["content"], effort="low", temperature=0.0)
    assert [c.tokens for c in res.candidates] == [1500, 1500]
