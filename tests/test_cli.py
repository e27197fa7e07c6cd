"""The command line as a shell meets it: one line per error, never a traceback; quiet exits on a
closed pipe (0 or 141) and on Ctrl-C at any moment (130); `--version`; `-v` after the command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edge_metastone import __version__
from edge_metastone.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO))
CLI = [sys.executable, "-m", "edge_metastone"]
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored", "KeyboardInterrupt")


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=300,
        **kwargs,
    )


def _quiet(stderr: str) -> None:
    assert not any(word in stderr for word in NOISE), stderr


def test_version_is_the_package_version():
    proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edge-metastone {__version__}"


def test_version_has_one_source():
    from importlib.metadata import version

    assert version("edge-metastone") == __version__
    text = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and __version__ not in text


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["inspect", "m.gguf"], 0),
        (["inspect", "m.gguf", "-v"], 1),
        (["-v", "inspect", "m.gguf", "-vv"], 3),
        (["reason", "hi", "--verbose"], 1),
    ],
)
def test_verbose_before_and_after_the_command(argv, level):
    args = build_parser().parse_args(argv)
    assert args.verbose + args.verbose_after == level


def test_strategy_help_states_the_recorded_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in ("reason", "batch"):
        action = next(a for a in sub.choices[name]._actions if a.dest == "strategy")
        assert "metastone.default_strategy" in action.help, action.help


UNEXPECTED = """
    import sys
    import edge_metastone.commands.doctor as doctor

    def boom(args):
        raise ZeroDivisionError("division by zero\\nsecond line")

    doctor.run = boom
    from edge_metastone.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_an_unexpected_error_is_one_line_and_v_shows_the_traceback():
    proc = _python(UNEXPECTED, "doctor")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("edge-metastone doctor: ") and "ZeroDivisionError" in proc.stderr
    _quiet(proc.stderr)
    proc = _python(UNEXPECTED, "doctor", "-v")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "boom" in proc.stderr


def test_train_sprm_without_torch_is_one_line(tmp_path):
    # a torch that cannot be imported, as on a machine without the [train] extra
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError('no torch here', name='torch')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO)]))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    args = ["train-sprm", "--model", "m.gguf", "--data", str(data), "-o", str(tmp_path / "o")]
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "train-sprm: error: train-sprm needs torch" in proc.stderr
    assert "edge-metastone[train]" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args",
    [["reason", "What is 2+3?", "--effort", "low"], ["inspect"], ["--help"], ["--version"]],
    ids=["reason", "inspect", "help", "version"],
)
def test_a_closed_pipe_exits_quietly(args):
    # `... | head -1` made deterministic: the read end is closed before the child writes at all
    if args == ["inspect"]:
        from edge_metastone.models import default_model_path

        args = ["inspect", str(default_model_path())]
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [*CLI, *args], stdout=w, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO
        )
    finally:
        os.close(w)
    assert proc.returncode in (0, 141), (proc.returncode, proc.stderr)
    _quiet(proc.stderr)


IMPORT_INTERRUPTED = """
    import sys

    class CtrlC:  # a Ctrl-C while the commands are being imported
        def find_spec(self, name, path=None, target=None):
            if name == "edge_metastone.commands.reason":
                raise KeyboardInterrupt
            return None

    sys.meta_path.insert(0, CtrlC())
    from edge_metastone.cli import main
    sys.exit(main(["reason", "hi"]))
"""


def test_ctrl_c_while_importing_the_commands_is_130():
    proc = _python(IMPORT_INTERRUPTED)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "edge-metastone: interrupted"


def _blocked_reading_stdin(pid: int) -> bool:
    # /proc/PID/syscall: "0 0x0 ..." is read(2) on fd 0
    try:
        return Path(f"/proc/{pid}/syscall").read_text().startswith("0 0x0 ")
    except OSError:
        return False


# The console script's own code, with a mark once its one import is done: from there on every
# moment is the CLI's (before it, the interpreter's own start-up, site and .pth files, can print
# its own KeyboardInterrupt traceback; no code of a package runs then).
CONSOLE_SCRIPT = """
    import os, sys
    sys.argv[0] = "edge-metastone"  # as the console script's
    from edge_metastone.cli import main
    os.write(int(sys.argv[1]), b"x")
    sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("when", [0.0, 0.01, 0.03, 0.1, 0.2, "reading"])
def test_sigint_at_any_moment_exits_130_quietly(when):
    # `reason -` waits on stdin, so it is still running whenever the signal lands: during the
    # commands' imports, the parsing, the model's load, or (at "reading") the command itself
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CONSOLE_SCRIPT), str(w), "reason", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=REPO,
        pass_fds=(w,),
        # a shell without job control starts background jobs with SIGINT ignored, and Python
        # keeps it ignored: the child gets the default a terminal's Ctrl-C meets
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(w)
    with os.fdopen(r, "rb") as mark:
        assert mark.read(1) == b"x", proc.communicate()
    if when == "reading":
        try:
            Path(f"/proc/{proc.pid}/syscall").read_text()
        except OSError:
            proc.kill()
            proc.communicate()
            pytest.skip("/proc/PID/syscall cannot be read here")
        for _ in range(60_000):  # a bound on polls, not a time limit
            if _blocked_reading_stdin(proc.pid):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.005)
        else:
            proc.kill()
            pytest.fail("the command never blocked on stdin")
    else:
        time.sleep(when)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    _quiet(err)
    assert out == "" and proc.returncode == 130, (proc.returncode, err)
    assert err in ("edge-metastone: interrupted\n", "edge-metastone reason: interrupted\n"), err


def _reason(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_metastone", "reason", "--max-new-tokens", "40", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_sampling_flags_and_an_explicit_k():
    """`--temperature 0` is greedy (every candidate the same), `--top-k 1` draws the same tokens
    as greedy, `--k N` runs N candidates, and a `--k` that cannot go with the effort is one line."""
    import json

    q = "What is 12+7*3?"
    greedy = json.loads(_reason("--temperature", "0", "--k", "3", "--json", q).stdout)
    assert greedy["k"] == 3 and len(greedy["candidates"]) == 3
    assert len({tuple(c["token_ids"]) for c in greedy["candidates"]}) == 1
    top1 = json.loads(_reason("--top-k", "1", "--k", "1", "--seed", "4", "--json", q).stdout)
    assert top1["candidates"][0]["token_ids"] == greedy["candidates"][0]["token_ids"]
    hot = json.loads(
        _reason("--temperature", "1.5", "--top-p", "1", "--min-p", "0", "--json", q).stdout
    )
    assert hot["k"] == 8 and len({tuple(c["token_ids"]) for c in hot["candidates"]}) > 1
    bad = _reason("--k", "3", "--effort", "auto", q)
    assert bad.returncode == 1 and "does not go with effort auto" in bad.stderr
    assert bad.stderr.count("\n") == 1
    bad = _reason("--min-p", "1.5", q)
    assert bad.returncode == 1 and "min_p" in bad.stderr and "Traceback" not in bad.stderr
