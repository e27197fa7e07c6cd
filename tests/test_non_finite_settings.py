"""NaN and infinite settings are refused at every door (issue 24, "One line, never a traceback"):
the Python API's settings types and the Reasoner, the `reason` and `batch` flags, the server's
request fields, and a batch file's lines. Each refusal names the setting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fake_backend import FakeBackend, Script
from starlette.testclient import TestClient

from edge_metastone.batch.jobfile import parse_line, read_input
from edge_metastone.cli import main
from edge_metastone.errors import InvalidRequestError
from edge_metastone.options import ReasonOptions
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import MIB, Calibration
from edge_metastone.server.app import ServerSettings, create_app
from edge_metastone.types import GenerationSettings, SamplingSettings

# every spelling of "not a finite number" a caller can produce: Python's, numpy's, JSON's 1e309
NON_FINITE = [
    math.nan,
    math.inf,
    -math.inf,
    json.loads("1e309"),
    json.loads("-1e309"),
    np.float32("nan"),
    np.float64("inf"),
]
IDS = ["nan", "inf", "-inf", "1e309", "-1e309", "np.float32-nan", "np.float64-inf"]
CAL = Calibration({1: 0.01, 2: 0.011, 4: 0.012, 8: 0.015, 16: 0.02, 32: 0.03}, 2000.0, 200 * MIB, 2)
USER = [{"role": "user", "content": "What is 2+3?"}]


def refused(make, param: str) -> InvalidRequestError:
    """`make()` raises an `InvalidRequestError` naming `param`; returns it."""
    with pytest.raises(InvalidRequestError) as e:
        make()
    assert e.value.param == param, (e.value.param, str(e.value))
    return e.value


# --- the Python API ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", NON_FINITE, ids=IDS)
@pytest.mark.parametrize(
    "field", ["temperature", "top_p", "latency_budget", "memory_budget", "seed", "max_new_tokens"]
)
def test_reason_options_refuse_non_finite_numbers(field, value):
    refused(lambda: ReasonOptions(**{field: value}), field)


@pytest.mark.parametrize("value", NON_FINITE, ids=IDS)
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repeat_penalty", "top_k"])
def test_sampling_settings_refuse_non_finite_numbers(field, value):
    refused(lambda: SamplingSettings(**{field: value}), field)


@pytest.mark.parametrize("value", NON_FINITE, ids=IDS)
def test_a_non_finite_logit_bias_is_refused(value):
    # a NaN bias makes every logit it touches NaN; -inf is refused too: -100 bans a token
    refused(lambda: SamplingSettings(logit_bias=((5, value),)), "logit_bias")
    refused(lambda: SamplingSettings(logit_bias=((5, 1.0), (6, value))), "logit_bias")


def test_logit_bias_pairs_are_checked_and_kept_as_plain_numbers():
    s = SamplingSettings(logit_bias=[[np.int64(3), np.float32(2.5)], (4, -1e9)])
    assert s.logit_bias == ((3, 2.5), (4, -1e9))
    assert all(type(t) is int and type(b) is float for t, b in s.logit_bias)
    for bad in (5, ((-1, 1.0),), ((1.5, 1.0),), ((1, 2.0, 3.0),), ((True, 1.0),), ((1, "x"),)):
        refused(lambda bad=bad: SamplingSettings(logit_bias=bad), "logit_bias")


@pytest.mark.parametrize("value", [*NON_FINITE, 2.5, True], ids=[*IDS, "2.5", "True"])
@pytest.mark.parametrize("field", ["max_new_tokens", "max_answer_tokens", "max_candidates"])
def test_generation_counts_must_be_integers(field, value):
    refused(lambda: GenerationSettings(**{field: value}), field)


@pytest.mark.parametrize("field", ["latency_budget", "memory_budget"])
def test_a_bool_is_not_a_budget(field):
    refused(lambda: ReasonOptions(**{field: True}), field)
    assert getattr(ReasonOptions(**{field: np.float32(5)}), field) == 5  # numpy numbers are


def test_an_integer_too_large_for_a_float_is_not_a_finite_budget():
    # math.isfinite(10**400) raises OverflowError: a clear refusal instead
    refused(lambda: ReasonOptions(latency_budget=10**400), "latency_budget")


@pytest.mark.parametrize("value", [*NON_FINITE, -3], ids=[*IDS, "-3"])
def test_the_reasoners_max_new_tokens_is_checked_when_it_is_made(value):
    fake = FakeBackend([Script([0.5])])
    refused(lambda: Reasoner(backend=fake, max_new_tokens=value, calibration=CAL), "max_new_tokens")
    assert fake.calls == 0


# --- the command line -------------------------------------------------------------------------

FLAG_VALUES = ["nan", "inf", "-inf", "1e309", "-1e309", "NaN", "Infinity"]  # as --flag=VALUE


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize("value", FLAG_VALUES)
@pytest.mark.parametrize("flag", ["--latency-budget", "--memory-budget"])
def test_reason_flags_refuse_non_finite_numbers(capsys, flag, value):
    field = flag[2:].replace("-", "_")
    one_line_error(capsys, ["reason", f"{flag}={value}", "hi"], f"{field} must be a finite")


@pytest.mark.parametrize("value", FLAG_VALUES)
def test_serve_refuses_a_non_finite_shutdown_timeout_before_loading(capsys, value):
    one_line_error(capsys, ["serve", f"--shutdown-timeout={value}"], "--shutdown-timeout must be")


@pytest.mark.parametrize("value", FLAG_VALUES)
@pytest.mark.parametrize("flag", ["--lr", "--l2", "--weight-decay"])
def test_train_sprm_refuses_non_finite_numbers(capsys, tmp_path, flag, value):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": 2}) + "\n")
    argv = ["train-sprm", "--model", "m.gguf", "--data", str(data), "-o", str(tmp_path / "o.gguf")]
    one_line_error(capsys, [*argv, f"{flag}={value}"], "must be a finite")


@pytest.mark.parametrize("value", FLAG_VALUES)
@pytest.mark.parametrize("flag", ["--latency-budget", "--memory-budget"])
def test_batch_flags_refuse_non_finite_numbers_before_any_work(capsys, tmp_path, flag, value):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "prompt": "What is 1+1?"}) + "\n")
    field = flag[2:].replace("-", "_")
    argv = ["batch", str(inp), "-o", str(tmp_path / "out.jsonl"), f"{flag}={value}"]
    one_line_error(capsys, argv, f"{field} must be a finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# --- the server -------------------------------------------------------------------------------

FIELDS = ["temperature", "top_p", "latency_budget", "memory_budget", "seed", "max_tokens"]


@pytest.fixture(scope="module")
def http():
    fake = FakeBackend([Script([0.5, 0.6], text="</think> \\boxed{5}", every=10)])
    app = create_app(Reasoner(backend=fake, calibration=CAL), ServerSettings(), model_id="fake")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, fake


def post(http, field: str, literal: str):
    body = f'{{"messages": {json.dumps(USER)}, "effort": "low", "{field}": {literal}}}'
    return http.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize("literal", ["1e309", "-1e309", "1e999"])
@pytest.mark.parametrize("field", FIELDS)
def test_an_overflowing_number_is_a_400_naming_the_field(http, field, literal):
    """1e309 is valid JSON that reads as infinity: refused as that field's error."""
    client, fake = http
    before = fake.calls
    r = post(client, field, literal)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == field, error
    assert field in error["message"] and "finite" in error["message"]
    assert fake.calls == before  # never reached the model


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", FIELDS)
def test_nan_and_infinity_literals_are_a_400_invalid_json(http, field, literal):
    """NaN and Infinity are not JSON (RFC 8259): the body is refused before any field is read,
    with the constant named."""
    client, fake = http
    before = fake.calls
    r = post(client, field, literal)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_json", error
    assert f"{literal.lstrip('-')} is not valid JSON" in error["message"]
    assert fake.calls == before


def test_a_finite_request_is_served(http):
    client, _ = http
    assert post(client, "temperature", "0.5").status_code == 200


# --- a batch file's lines ---------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["answer", "id", "extra"])
def test_a_line_with_a_nan_or_infinity_constant_is_not_json(field, literal):
    line = f'{{"id": "a", "prompt": "What is 1+1?", "{field}": {literal}}}'
    item = parse_line(3, line.encode())
    assert item.error is not None and item.prompt is None
    assert "not JSON" in item.error and literal.lstrip("-") in item.error, item.error


@pytest.mark.parametrize("literal", ["1e309", "-1e309"])
def test_an_overflowing_answer_is_refused(literal):
    line = f'{{"id": "a", "prompt": "What is 1+1?", "answer": {literal}}}'
    item = parse_line(4, line.encode())
    assert item.error == "'answer' must be a string or a finite number"
    assert item.id == "a" and item.prompt is None


def test_finite_answers_still_read_as_text(tmp_path):
    lines = [
        {"id": 1, "prompt": "p", "answer": 2},
        {"id": 2, "prompt": "p", "answer": 0.5},
        {"id": 3, "prompt": "p", "answer": 10**30},
        {"id": 4, "prompt": "p", "answer": "NaN"},  # a string is any text, even this one
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"id": 5, "answer": NaN}\n')
    items, _ = read_input(inp)
    assert [i.answer for i in items[:4]] == ["2", "0.5", str(10**30), "NaN"]
    assert all(i.error is None for i in items[:4])
    assert items[4].id is None and "NaN is not valid JSON" in items[4].error
