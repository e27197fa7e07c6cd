"""The batch job's files: the input lines (validated one by one), the output log (one complete
JSON line per record, appended and fsynced, so a SIGKILL never loses or half-writes one) and the
options sidecar that a resumed run must match."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.paths import write_text_atomic
from edge_metastone.types import finite_number

MAX_PROMPT_CHARS = 1_000_000  # a prompt is text for a model, not a data dump
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Item:
    """One input line: its 1-based line number and either a request or the reason it is bad."""

    line: int
    id: str | int | None
    prompt: str | list[dict[str, str]] | None = None
    answer: str | None = None
    error: str | None = None


def short_text(text: str) -> str:
    """`text` on one line, at most MAX_ERROR_CHARS long (for error messages)."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _messages(value: Any) -> list[dict[str, str]] | str:
    """The messages, or what is wrong with them."""
    if not isinstance(value, list) or not value:
        return "'messages' must be a non-empty list of {role, content} objects"
    out = []
    for m in value:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            return "every message must be an object with string 'role' and 'content'"
        out.append({"role": m["role"], "content": m["content"]})
    if sum(len(m["content"]) for m in out) > MAX_PROMPT_CHARS:
        return f"the messages are longer than {MAX_PROMPT_CHARS} characters"
    return out


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(n: int, raw: bytes) -> Item:
    """One input line as an `Item` (never raises: a bad line becomes an item with an error)."""
    try:
        rec = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        return Item(n, None, error="not UTF-8 text")
    except ValueError as e:
        return Item(n, None, error=short_text(f"not JSON ({e})"))
    if not isinstance(rec, dict):
        return Item(n, None, error="not a JSON object")
    rid = rec.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return Item(n, None, error="'id' must be a string or an integer")
    bad = lambda msg: Item(n, rid, error=msg)  # noqa: E731
    answer = rec.get("answer")
    if answer is not None:
        number = (isinstance(answer, int) and not isinstance(answer, bool)) or finite_number(answer)
        if not (isinstance(answer, str) or number):  # 1e309 reads as inf, NaN is refused above
            return bad("'answer' must be a string or a finite number")
        answer = str(answer)
    if "prompt" in rec and "messages" in rec:
        return bad("give 'prompt' or 'messages', not both")
    if "messages" in rec:
        msgs = _messages(rec["messages"])
        return bad(msgs) if isinstance(msgs, str) else Item(n, rid, msgs, answer)
    prompt = rec.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return bad("no prompt: 'prompt' must be a non-empty string (or give 'messages')")
    if len(prompt) > MAX_PROMPT_CHARS:
        return bad(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    return Item(n, rid, prompt, answer)


def read_input(path: Path) -> tuple[list[Item], str]:
    """Every non-blank line of IN.jsonl as an `Item`, and the file's sha256. Duplicate ids are
    refused here, before any work, with the two line numbers."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EdgeMetastoneError(f"{path}: no such file") from None
    except OSError as e:
        raise EdgeMetastoneError(f"{path}: cannot read ({e.strerror})") from None
    items: list[Item] = []
    first: dict[str, int] = {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        item = parse_line(n, raw)
        if item.id is not None:
            key = json.dumps(item.id)
            if key in first:
                raise EdgeMetastoneError(
                    f"{path}:{n}: duplicate id {key} (first on line {first[key]}); ids must be unique"
                )
            first[key] = n
        items.append(item)
    if not items:
        raise EdgeMetastoneError(f"{path}: no input lines")
    return items, hashlib.sha256(data).hexdigest()


def record_seed(seed: int, rid: str | int | None) -> int:
    """A record's sampling seed: a function of the job's seed and the record's id only, so a
    record's result does not depend on where in the file, or in which run, it is made."""
    h = hashlib.sha256(f"{seed}:{json.dumps(rid)}".encode()).hexdigest()
    return int(h[:8], 16) & 0x7FFFFFFF


def dumps(rec: Mapping[str, Any]) -> str:
    """One record as strict JSON (no NaN or infinity): the text of one output line."""
    return json.dumps(rec, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def sidecar(out: Path, kind: str) -> Path:
    """A file beside the output: OUT.options.json, OUT.summary.json, OUT.sweep.png."""
    return (
        out.with_name(out.stem + "." + kind) if out.suffix else out.with_name(out.name + "." + kind)
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _diff(stored: Any, identity: dict[str, Any]) -> str:
    if not isinstance(stored, dict):
        return "unreadable options file"
    a, b = _flat(stored), _flat(identity)
    keys = sorted(set(a) | set(b))
    return short_text(
        "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k))
    )


class ResultLog:
    """OUT.jsonl opened for appending records: locked against a second writer, a half-written
    last line (a crash during a write) cut off, the options checked against OUT.options.json."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        self.path = path
        self.options_path = sidecar(path, "options.json")
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise EdgeMetastoneError(f"{path}: cannot write ({e.strerror})") from None
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EdgeMetastoneError(f"{path}: another batch job is writing it") from None
            self._check_options(identity)
            self.records = self._read_complete()
        except BaseException:
            os.close(self._fd)
            raise

    def _check_options(self, identity: dict[str, Any]) -> None:
        has_records = os.fstat(self._fd).st_size > 0
        if self.options_path.is_file():
            try:
                stored = json.loads(self.options_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                stored = None
            if stored != identity:
                raise EdgeMetastoneError(
                    f"{self.path} was started with other options or input ({_diff(stored, identity)}); "
                    "rerun with the same command to resume, or pass another -o"
                )
            return
        if has_records:
            raise EdgeMetastoneError(
                f"{self.path} exists but has no {self.options_path.name}: not a batch output; "
                "pass another -o"
            )
        write_text_atomic(self.options_path, json.dumps(identity, indent=2, sort_keys=True) + "\n")
        _fsync_dir(self.path)

    def _read_complete(self) -> list[dict[str, Any]]:
        """The complete records; a trailing partial line is truncated away."""
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # killed mid-write: drop the partial line
            os.truncate(self.path, end)
            os.fsync(self._fd)
        records = []
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or "line" not in rec:
                raise EdgeMetastoneError(f"{self.path}:{n}: not a batch record; pass another -o")
            records.append(rec)
        return records

    def append(self, text: str) -> None:
        """Append one record line (a single write, then fsync: it is on disk whole, or not at all
        after the truncation on the next start)."""
        data = (text + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):  # short writes only on odd file systems; finish the line
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        """Release the lock and the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
