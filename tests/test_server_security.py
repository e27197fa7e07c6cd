"""Who may use the server and for how long: JSON bodies only (415), the `Host` header (421, against
DNS rebinding), the optional API key (401; the page's session cookie), no CORS headers, the
per-request time cap, and the one-line request log. In-process on the scripted fake backend, plus
one `serve` subprocess for the flags."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from fake_backend import FakeBackend, Script
from server_process import ServerProcess
from starlette.testclient import TestClient

from conftest import run_cli
from edge_metastone.errors import InvalidRequestError
from edge_metastone.reasoner import Reasoner
from edge_metastone.scheduler import MIB, Calibration
from edge_metastone.server.app import ServerSettings, create_app
from edge_metastone.server.guard import (
    ACCESS_LOGGER,
    SESSION_COOKIE,
    allowed_hosts,
    host_name,
    same_secret,
)

CAL = Calibration({1: 0.01, 2: 0.011, 4: 0.012, 8: 0.015, 16: 0.02, 32: 0.03}, 2000.0, 200 * MIB, 2)
USER = [{"role": "user", "content": "What is 2+3?"}]
BODY = {"messages": USER, "effort": "low", "max_tokens": 64, "seed": 1}
JSON = {"content-type": "application/json"}
KEY = "s3cret-key-for-tests"
SHORT = [Script([0.5, 0.6], text="</think> \\boxed{5}", every=10)]


def serve(scripts=SHORT, *, round_s: float = 0.0, **settings) -> tuple[TestClient, FakeBackend]:
    """A TestClient on the app over a fake model, addressed as http://127.0.0.1."""
    fake = FakeBackend(scripts, round_s=round_s)
    reasoner = Reasoner(backend=fake, calibration=CAL)
    app = create_app(reasoner, ServerSettings(**settings), model_id="fake")
    return TestClient(app, base_url="http://127.0.0.1"), fake


def post(http: TestClient, body=BODY, **headers: str) -> httpx.Response:
    return http.post("/v1/chat/completions", content=json.dumps(body), headers=headers)


# --- Content-Type ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"],
)
def test_a_post_that_is_not_json_is_a_415_and_never_reaches_the_model(content_type):
    """The body a cross-site page can send without a CORS preflight (text/plain, a form) is
    refused before it is read or queued."""
    http, fake = serve()
    with http:
        headers = {"content-type": content_type} if content_type else {}
        r = post(http, **headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "application/json" in r.json()["error"]["message"]
    assert fake.calls == 0


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_a_json_post_is_served(content_type):
    http, fake = serve()
    with http:
        r = post(http, **{"content-type": content_type})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]  # the fake writes "</think> \\boxed{5}"
    assert msg["content"] == "\\boxed{5}" and msg["reasoning_content"] == "" and fake.calls == 1


# --- Host -------------------------------------------------------------------------------------


def test_host_names_parse_with_and_without_a_port():
    assert host_name("LocalHost:8080") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("[::1]:8080") == "::1" and host_name("[::1]") == "::1"
    assert host_name("example.com.") == "example.com"
    for bad in ("", "::1", "a:b", "[::1]x", "evil.com/x", "a b", "user@host"):
        assert host_name(bad) is None, bad


def test_allowed_hosts_are_the_loopback_names_the_bound_address_and_the_extra_ones():
    assert allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert allowed_hosts("192.168.1.5", ["My.Lan:8080", "[fe80::1]"]) == (
        "localhost",
        "127.0.0.1",
        "::1",
        "192.168.1.5",
        "my.lan",
        "fe80::1",
    )
    assert "*" in allowed_hosts("127.0.0.1", ["*"])
    with pytest.raises(InvalidRequestError, match="allowed-host"):
        allowed_hosts("127.0.0.1", ["evil.com/x"])


@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:8080", "127.0.0.1.nip.io:8080", ""]
)
def test_a_foreign_host_header_is_a_421_everywhere(host):
    """DNS rebinding: a page on attacker.example that resolves to 127.0.0.1 sends its own name."""
    http, fake = serve()
    with http:
        for method, path in (("GET", "/"), ("GET", "/v1/models"), ("GET", "/health")):
            r = http.request(method, path, headers={"host": host})
            assert r.status_code == 421, (path, r.text)
            assert r.json()["error"]["code"] == "host_not_allowed"
            assert "--allowed-host" in r.json()["error"]["message"]
        r = post(http, host=host, **JSON)
        assert r.status_code == 421
    assert fake.calls == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8080", "localhost:8080", "[::1]:8080"])
def test_the_loopback_names_are_served_with_and_without_a_port(host):
    http, _ = serve()
    with http:
        page = http.get("/", headers={"host": host})
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert post(http, host=host, **JSON).status_code == 200


def test_allowed_host_adds_a_name_and_star_allows_any():
    http, _ = serve(allowed_hosts=allowed_hosts("127.0.0.1", ["my.lan"]))
    with http:
        assert http.get("/v1/models", headers={"host": "my.lan:8080"}).status_code == 200
        assert http.get("/v1/models", headers={"host": "other.lan"}).status_code == 421
    http, _ = serve(allowed_hosts=allowed_hosts("127.0.0.1", ["*"]))
    with http:
        assert http.get("/v1/models", headers={"host": "other.lan"}).status_code == 200


# --- API key ----------------------------------------------------------------------------------


def test_with_an_api_key_the_api_needs_the_bearer_token():
    http, fake = serve(api_key=KEY)
    with http:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            for r in (http.get("/v1/models", headers=headers), post(http, **JSON, **headers)):
                assert r.status_code == 401, r.text
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        assert fake.calls == 0
        ok = {"authorization": f"Bearer {KEY}"}
        assert http.get("/v1/models", headers=ok).status_code == 200
        assert post(http, **JSON, **ok).status_code == 200
        assert http.get("/health").status_code == 200  # monitoring needs no key
    assert "s3cret" not in repr(ServerSettings(api_key=KEY))


def test_with_an_api_key_the_page_asks_for_it_once_and_keeps_a_session_cookie():
    http, _ = serve(api_key=KEY)
    with http:
        form = http.get("/")
        assert form.status_code == 401 and 'name="key"' in form.text
        assert "not this server" in http.get("/", params={"key": "wrong"}).text
        assert SESSION_COOKIE not in http.cookies
        r = http.get("/", params={"key": KEY}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert KEY not in r.headers["set-cookie"]  # the cookie is derived, not the key itself
        page = http.get("/")  # the client now carries the cookie, as the browser does
        assert page.status_code == 200 and "<script" in page.text
        assert http.get("/v1/models").status_code == 200
        assert post(http, **JSON).status_code == 200
        http.cookies.clear()
        http.cookies.set(SESSION_COOKIE, "forged")
        assert http.get("/v1/models").status_code == 401


def test_keys_compare_by_digest():
    assert same_secret(KEY, KEY) and not same_secret(KEY, KEY + "x")
    assert not same_secret("", KEY)
    with pytest.raises(InvalidRequestError, match="ASCII"):
        ServerSettings(api_key="has space")


# --- CORS -------------------------------------------------------------------------------------


def test_no_response_carries_cors_headers_not_even_a_preflight():
    http, _ = serve()
    origin = {"origin": "https://attacker.example"}
    with http:
        preflight = http.options(
            "/v1/chat/completions",
            headers={
                **origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        responses = [
            preflight,
            http.get("/", headers=origin),
            http.get("/v1/models", headers=origin),
            post(http, **origin, **JSON),
            post(http, **origin, **{"content-type": "text/plain"}),
        ]
    assert preflight.status_code >= 400
    for r in responses:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers


# --- the time cap -----------------------------------------------------------------------------


def test_the_time_cap_stops_a_long_request_with_the_best_answer_so_far():
    """4,000 tokens of a candidate take >= 8 s on the fake (2 ms per round); a 0.5 s cap stops
    it early, answers with what it has, and says so."""
    long = [Script([0.5] * 400, text="9" * 4000, every=10)]
    http, _ = serve(long, round_s=0.002, max_request_seconds=0.5)
    body = {**BODY, "max_tokens": 4000}
    with http:
        r = post(http, body, **JSON)
        assert r.status_code == 200, r.text
        ext = r.json()["metastone"]
        assert ext["capped"] is True and ext["early_stop"] is True
        assert "time limit" in ext["scheduler"]["reason"]
        assert all(0 < c["tokens"] < 4000 for c in ext["candidates"]), ext["candidates"]
        assert set(r.json()["choices"][0]["message"]["content"]) == {"9"}
        assert r.json()["choices"][0]["finish_reason"] == "length"
        stream = http.post(
            "/v1/chat/completions", content=json.dumps({**body, "stream": True}), headers=JSON
        )
        results = [
            json.loads(line[6:])["metastone"]["result"]
            for line in stream.text.splitlines()
            if line.startswith("data: {") and '"result"' in line
        ]
        assert len(results) == 1 and results[0]["capped"] is True


def test_a_capped_request_without_any_answer_is_a_clear_error():
    blank = [Script([0.5] * 400, text=" " * 4000, every=10)]  # text only after 4,000 tokens
    http, _ = serve(blank, round_s=0.002, max_request_seconds=0.3)
    with http:
        r = post(http, {**BODY, "max_tokens": 4000}, **JSON)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "request_time_limit"
    assert "--max-request-seconds" in r.json()["error"]["message"]


def test_a_request_within_the_cap_is_not_marked():
    http, _ = serve(max_request_seconds=60)
    with http:
        ext = post(http, **JSON).json()["metastone"]
    assert ext["capped"] is False and ext["early_stop"] is False


def test_the_cap_must_be_a_positive_number():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InvalidRequestError, match="max_request_seconds"):
            ServerSettings(max_request_seconds=bad)


# --- the request log --------------------------------------------------------------------------


def test_each_request_is_one_log_line_with_method_path_status_tokens_and_time(caplog):
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    http, fake = serve()
    with http:
        post(http, **JSON)
        http.get("/a%0Ab")  # a newline in the path stays escaped in the one line
        post(http, **{"content-type": "text/plain"})
    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 3, lines
    assert lines[0].startswith("testclient POST /v1/chat/completions 200 ")
    assert f" {fake.generated} tokens " in lines[0] and lines[0].endswith(" s")
    assert "\n" not in lines[1] and "GET /a\\nb 404 -" in lines[1]
    assert "POST /v1/chat/completions 415 -" in lines[2]


def test_a_quiet_log_writes_nothing(caplog):
    caplog.set_level(logging.WARNING, logger=ACCESS_LOGGER)
    http, _ = serve()
    with http:
        post(http, **JSON)
    assert not [r for r in caplog.records if r.name == ACCESS_LOGGER]


# --- the command line -------------------------------------------------------------------------


def test_serve_flags_in_a_subprocess():
    """The key from the environment (kept out of `ps`), an extra host, the request log on stderr
    by default and `--quiet`."""
    args = ("--max-new-tokens", "8", "--max-request-seconds", "60", "--allowed-host", "my.lan")
    with ServerProcess(*args, env={"EDGE_METASTONE_API_KEY": KEY}) as server:
        ok = {"authorization": f"Bearer {KEY}"}
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        models = httpx.get(server.url + "/v1/models", headers={**ok, "host": "my.lan"}, timeout=10)
        assert models.status_code == 200
        assert httpx.get(server.url + "/health", headers={"host": "evil.com"}).status_code == 421
        r = httpx.post(
            server.url + "/v1/chat/completions", json=BODY, headers=ok, timeout=60
        ).json()
        assert r["metastone"]["capped"] is False
        assert server.stop() == 0
        assert KEY not in " ".join(server.proc.args)
        assert "(API key required)" in server.stdout
    log = [line for line in server.stderr.splitlines() if line.startswith("edge-metastone serve: ")]
    assert any("GET /v1/models 401 -" in line for line in log), server.stderr
    assert any("GET /health 421 -" in line for line in log), server.stderr
    tokens = r["usage"]["completion_tokens"]
    assert any(f"POST /v1/chat/completions 200 {tokens} tokens" in line for line in log), log
    assert "Traceback" not in server.stderr
    with ServerProcess("--max-new-tokens", "8", "--quiet") as quiet:
        httpx.get(quiet.url + "/v1/models", timeout=10)
        assert quiet.stop() == 0
    assert "/v1/models" not in quiet.stderr, quiet.stderr


def test_serve_help_and_bad_flags():
    help_text = run_cli("serve", "--help").stdout
    for flag in ("--allowed-host", "--api-key", "--max-request-seconds", "--quiet"):
        assert flag in help_text
    for bad in (["--max-request-seconds", "0"], ["--allowed-host", "a/b"]):
        proc = run_cli("serve", "--port", "0", *bad)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
