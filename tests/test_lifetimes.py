"""Issue 24's lifetimes: a model closed from inside its own request's callback, or used after it is
closed, gives a clear "closed" error and never touches freed memory. Each case runs in a child
process, so that a crash is a failed test, not a dead test run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import REPO


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_close_from_inside_on_event_is_a_clear_error(tiny_gguf):
    proc = run_script(
        """
        import sys
        from edge_metastone.errors import EdgeMetastoneError
        from edge_metastone.reasoner import Reasoner

        r = Reasoner(sys.argv[1], max_new_tokens=32)
        seen = []

        def on_event(ev):
            seen.append(ev)
            if len(seen) == 1:
                r.close()  # the model must outlive the generation that is running
        try:
            r.reason("What is 2+2?", effort="low", seed=1, on_event=on_event)
        except EdgeMetastoneError as e:
            print("error:", e)
        try:
            r.reason("again", effort="low")
        except EdgeMetastoneError as e:
            print("after:", e)
        try:
            r.backend.tokenize("hello")
        except EdgeMetastoneError as e:
            print("tokenize:", e)
        print("events:", len(seen))
        """,
        str(tiny_gguf("q8_0")),
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert "closed" in lines["error"]
    assert "closed" in lines["after"]
    assert "closed" in lines["tokenize"]
    assert int(lines["events"]) <= 2  # it stopped at the next event


def test_a_closed_engine_refuses_every_use(tiny_gguf):
    proc = run_script(
        """
        import sys
        from edge_metastone.engine.engine import Engine
        from edge_metastone.errors import EdgeMetastoneError

        e = Engine(sys.argv[1])
        e.close()
        uses = {
            "tokenize": lambda: e.tokenize("hello <think>"),
            "tokenize_text": lambda: e.tokenize_text("hello"),
            "detokenize": lambda: e.detokenize([1, 2, 3]),
            "encode_chat": lambda: e.encode_chat([{"role": "user", "content": "hi"}]),
            "score_text": lambda: e.score_text("<think>a.\\n\\n</think>"),
        }
        for name, use in uses.items():
            try:
                use()
                print(name, "ran")
            except EdgeMetastoneError as err:
                print(name, "closed" if "closed" in str(err) else f"other {err}")
        """,
        str(tiny_gguf("q8_0")),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        w
        for name in ("tokenize", "tokenize_text", "detokenize", "encode_chat", "score_text")
        for w in (name, "closed")
    ], proc.stdout
