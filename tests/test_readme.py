"""The README and docs/ as a reader meets them: the Python examples run as written, every option
`--help` prints is in the command synopses of docs/cli.md (their one home: the README links there
and repeats none), the README's code map names what exists, every model-file key is documented,
and every link points inside the repository at something that exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_metastone import keys

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
CLI_DOC = DOCS / "cli.md"
MODEL_FILE_DOC = DOCS / "model-file.md"
COMMANDS = (
    "convert",
    "inspect",
    "score",
    "reason",
    "batch",
    "train-sprm",
    "serve",
    "calibrate",
    "doctor",
)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


def _blocks(text: str, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def _python_examples() -> list[tuple[str, int, str]]:
    out = []
    for path in (README, *sorted(DOCS.glob("*.md"))):
        for i, code in enumerate(_blocks(path.read_text(encoding="utf-8"), "python")):
            out.append((path.relative_to(REPO).as_posix(), i, code))
    return out


@pytest.mark.parametrize(("where", "n", "code"), _python_examples(), ids=lambda x: str(x)[:24])
def test_python_examples_run_as_written(where, n, code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,  # no file of the repository's may be needed beside it
    )
    assert proc.returncode == 0, f"{where} python block {n}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{where} python block {n} printed nothing"


def test_the_readme_example_asks_what_the_embedded_model_can_do():
    from edge_metastone.models.arithmetic import outside_arithmetic

    [code] = _blocks(README.read_text(encoding="utf-8"), "python")
    assert "Reasoner()" in code and ".gguf" not in code  # the embedded model, no missing file
    questions = re.findall(r'"(What is [^"]*)"', code)
    assert questions and all(outside_arithmetic(q) is None for q in questions), questions


def _help_options(command: str) -> list[tuple[str, ...]]:
    """Each option `edge-metastone COMMAND --help` lists, as its spellings (`-o`, `--output`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "edge_metastone", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="200"),
    )
    assert proc.returncode == 0, proc.stderr
    options = []
    for line in proc.stdout.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if m:
            flags = tuple(f.split()[0] for f in m.group(1).split(", "))
            if "--help" not in flags:
                options.append(flags)
    assert options, proc.stdout
    return options


def _synopses(path: Path) -> dict[str, str]:
    """The command synopses: the first ```bash block after the `Synopsis` heading, one entry per
    `edge-metastone COMMAND` line with its continuation lines."""
    text = path.read_text(encoding="utf-8")
    heading = re.search(r"^## Synopsis\n", text, re.M)
    assert heading, f"{path.name} has no Synopsis section"
    block = _blocks(text[heading.end() :], "bash")[0]
    out: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        m = re.match(r"^edge-metastone ([a-z-]+) ", line)
        if m:
            name = m.group(1)
            out[name] = ""
        if name is not None:
            out[name] += line + "\n"
        if not line.rstrip().endswith("\\"):
            name = None
    return out


def _has(synopsis: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", synopsis) is not None


def test_every_option_of_every_command_is_in_the_synopsis():
    synopses = _synopses(CLI_DOC)
    missing = {}
    for command in COMMANDS:
        assert command in synopses, f"docs/cli.md has no `{command}` synopsis"
        lacking = [
            "/".join(flags)
            for flags in _help_options(command)
            if not any(_has(synopses[command], f) for f in flags)
        ]
        if lacking:
            missing[command] = lacking
    assert not missing, f"docs/cli.md's synopses lack what --help lists: {missing}"


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a markdown text (fenced code blocks kept)."""
    m = re.search(rf"^## {re.escape(heading)}\n", text, re.M)
    assert m, f"no `## {heading}` section"
    end = re.search(r"^## ", text[m.end() :], re.M)
    return text[m.end() : m.end() + end.start()] if end else text[m.end() :]


def _synopsis_like(line: str) -> bool:
    """A line that reads like a synopsis: `edge-metastone` followed by two or more bracketed
    options (`[--json] [-v]`), or a `[...]` continuation line of one."""
    after = line.partition("edge-metastone ")[2] if "edge-metastone " in line else None
    if after is not None and len(re.findall(r"\[-", after)) >= 2:
        return True
    return re.match(r"^\s+\[-", line) is not None


def test_the_readme_links_to_the_synopses_and_repeats_none():
    """docs/cli.md is the one home of the synopses: the README's Commands section gives each
    command one line with a link there, and no synopsis (whole, a first line, or a continuation
    line) comes back into the README."""
    readme = README.read_text(encoding="utf-8")
    commands = _section(readme, "Commands")
    assert "](docs/cli.md)" in commands, "README's Commands section does not link docs/cli.md"
    unlinked = [c for c in COMMANDS if f"](docs/cli.md#{c})" not in commands]
    assert not unlinked, f"README's Commands section has no docs/cli.md link for {unlinked}"
    assert "```" not in commands, "README's Commands section holds a code block (a synopsis?)"
    assert not re.search(r"^## Synopsis", readme, re.M)
    repeated = [line for line in readme.splitlines() if _synopsis_like(line)]
    assert not repeated, f"the README repeats docs/cli.md's synopses: {repeated}"
    for command, synopsis in _synopses(CLI_DOC).items():
        first = synopsis.splitlines()[0].rstrip(" \\")
        assert first not in readme, f"the README repeats the `{command}` synopsis: {first}"


def test_the_synopsis_check_catches_a_repeated_synopsis():
    assert _synopsis_like("edge-metastone reason [--model FILE.gguf] [--json] PROMPT")
    assert _synopsis_like("    [--temperature T] [--top-p P] \\")
    assert not _synopsis_like("edge-metastone reason --model m.gguf --max-new-tokens 8192 \\")
    assert not _synopsis_like("`edge-metastone doctor [--json]` says what will run here")
    assert not _synopsis_like("    --stop '\\n\\n' --samples 8 --temperature 0.7")


def _layout_names() -> list[str]:
    """The modules and folders the README's code map (the ```block in `## Layout`) names."""
    block = _blocks(_section(README.read_text(encoding="utf-8"), "Layout"), "")[0]
    layers: list[str] = []
    for line in block.splitlines():  # a layer's name in the first 12 columns, then its parts
        if line[:12].strip():
            layers.append("")
        layers[-1] += " " + line[12:]
    names = []
    for layer in layers:
        layer = re.sub(r"\([^)]*\)", "", layer)  # what each one is for
        names += [name.strip() for name in layer.split(",") if name.strip()]
    return names


def test_the_readme_code_map_names_what_exists():
    names = _layout_names()
    assert len(names) >= 30, names
    gone = []
    for name in names:
        if name.endswith("/"):
            found = (REPO / "edge_metastone" / name).is_dir() or (REPO / name).is_dir()
        else:
            found = (REPO / "edge_metastone" / f"{name}.py").is_file()
        if not found:
            gone.append(name)
    assert not gone, f"README's Layout names what is not there: {gone}"
    readme = README.read_text(encoding="utf-8")
    table = _section(readme, "Layout").split("```", 1)[0]
    folders = re.findall(r"^\| `([^`]+)/` \|", table, re.M)
    assert folders and all((REPO / f).is_dir() for f in folders), folders
    assert readme.index("## Layout") < readme.index("## The embedded model"), "map near the top"


def test_reason_help_states_the_embedded_models_domain():
    proc = subprocess.run(
        [sys.executable, "-m", "edge_metastone", "reason", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    text = " ".join(proc.stdout.split())
    for fact in ("MetaStone-nano", "+ - *", "operands of one or two digits", "-999..999"):
        assert fact in text, fact
    assert "operands of one or two digits" in README.read_text(encoding="utf-8")


def test_every_model_file_key_is_documented():
    doc = MODEL_FILE_DOC.read_text(encoding="utf-8")
    defined = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert len(defined) >= 18  # the head, step, tokenizer and optional keys
    missing = sorted(k for k in defined if f"`{k}`" not in doc)
    assert not missing, f"docs/model-file.md does not document {missing}"


def test_every_adaptive_setting_is_documented():
    import dataclasses

    from edge_metastone.search.adaptive import AdaptiveSettings

    doc = MODEL_FILE_DOC.read_text(encoding="utf-8")
    section = doc.split("### `metastone.adaptive`", 1)[1].split("\n## ", 1)[0]
    fields = [f.name for f in dataclasses.fields(AdaptiveSettings)]
    assert set(fields) == set(__import__("json").loads(AdaptiveSettings().to_json()))
    missing = [f for f in fields if f"| `{f}` |" not in section]
    assert not missing, f"metastone.adaptive's fields not in the table: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = FENCE.sub("", text)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize(
    "doc", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.relative_to(REPO).as_posix()
)
def test_links_stay_in_the_repository_and_resolve(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    assert "../shared" not in text and "SPEC §" not in text and "SPEC.md" not in text
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if REPO not in dest.parents and dest != REPO:
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{doc.name}: {bad}"
