"""serve/guard.py: the API key's file and variable, the address a server may bind, the
origins a browser may call from, the Host a request may name, and the key's check."""

from __future__ import annotations

import hmac
import os

import pytest

from fragment_llm.errors import ConfigError
from fragment_llm.serve import guard
from fragment_llm.serve.errors import ApiError
from fragment_llm.serve.guard import (
    API_KEY_ENV,
    check_bind,
    check_host_header,
    check_key,
    check_origins,
    is_loopback,
    load_api_key,
)

KEY = "k" * 15 + "-0123456789"


def key_file(tmp_path, content: bytes):
    path = tmp_path / "key.txt"
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------ the key


@pytest.mark.parametrize("content", [KEY.encode(), KEY.encode() + b"\n", KEY.encode() + b"\r\n",
                                     b"  " + KEY.encode() + b"  \n",
                                     KEY.encode() + b"\nthe second line is ignored\n"])
def test_the_key_is_the_file_s_first_line_stripped(tmp_path, content):
    assert load_api_key(key_file(tmp_path, content), environ={}) == KEY.encode()


@pytest.mark.parametrize("content, words", [
    (b"", "0 characters; it needs at least 16"),
    (b"\n\n", "0 characters"),
    (b"short-key\n", "9 characters; it needs at least 16"),
    (b"x" * 4097, "file too large"),
    (b"\xff\xfe" + KEY.encode(), "not UTF-8"),
    (b"spaces in the key 0123456789", "spaces, control or non-ASCII"),
    ("kéy-with-non-ascii-0123456789".encode(), "non-ASCII"),
    (b"key-with-a-tab\t0123456789", "control"),
])
def test_a_bad_key_file_is_refused_naming_it(tmp_path, content, words):
    path = key_file(tmp_path, content)
    with pytest.raises(ConfigError, match=words) as refused:
        load_api_key(path, environ={})
    assert str(path) in str(refused.value)


def test_a_key_file_that_is_missing_or_a_symlink_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_api_key(tmp_path / "absent", environ={})
    real = key_file(tmp_path, KEY.encode())
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="symlink"):
        load_api_key(tmp_path / "link", environ={})
    with pytest.raises(ConfigError, match="not a regular file"):
        load_api_key(tmp_path, environ={})


def test_a_key_file_that_is_a_fifo_is_refused_without_blocking(tmp_path, no_hang):
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)  # nobody writes: a plain open() would wait for ever
    with pytest.raises(ConfigError, match="not a regular file"):
        load_api_key(fifo, environ={})


def test_the_key_from_the_environment_and_the_file_first(tmp_path):
    assert load_api_key(None, environ={API_KEY_ENV: f" {KEY}\n"}) == KEY.encode()
    other = key_file(tmp_path, b"from-the-file-0123456789")
    assert load_api_key(other, environ={API_KEY_ENV: KEY}) == b"from-the-file-0123456789"
    assert load_api_key(None, environ={}) is None
    for value, words in (("", "0 characters"), ("short", "5 characters"),
                         ("x" * 5000, "the limit is 4,096"), (KEY + " x", "spaces")):
        with pytest.raises(ConfigError, match=words) as refused:
            load_api_key(None, environ={API_KEY_ENV: value})
        assert f"${API_KEY_ENV}" in str(refused.value)


def test_the_key_is_compared_in_constant_time(monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(given: bytes, key: bytes) -> bool:
        compared.append((given, key))
        return compare(given, key)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    check_key(f"Bearer {KEY}", KEY.encode())
    with pytest.raises(ApiError):
        check_key(f"Bearer {KEY[:-1]}", KEY.encode())
    assert compared == [(KEY.encode(), KEY.encode()), (KEY[:-1].encode(), KEY.encode())]


@pytest.mark.parametrize("authorization", [None, "", KEY, f"Basic {KEY}", f"Bearer{KEY}",
                                           f"Bearer {KEY}x", "Bearer ", f"Bearer {KEY.upper()}",
                                           "Bearer " + "é" * 20])
def test_anything_but_the_bearer_key_is_401(authorization):
    with pytest.raises(ApiError) as refused:
        check_key(authorization, KEY.encode())
    assert refused.value.status == 401
    assert refused.value.headers == {"WWW-Authenticate": "Bearer"}


def test_the_bearer_key_passes_and_no_key_means_no_check():
    check_key(f"Bearer {KEY}", KEY.encode())
    check_key(f"bearer  {KEY} ", KEY.encode())
    check_key(None, None)


# ------------------------------------------------------------------- the address


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LocalHost", "::1", "[::1]",
                                  "127.8.9.10"])
def test_loopback_may_be_bound_without_a_key(host):
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "fe80::1",  # noqa: S104
                                  "example.com", "localhost.example.com"])
def test_anything_else_needs_a_key(host):
    with pytest.raises(ConfigError, match=f"--host {host} is reachable from other machines"):
        check_bind(host, None)
    check_bind(host, KEY.encode())


@pytest.mark.parametrize("origin", ["https://app.example", "http://localhost:5173",
                                    "https://app.example:8443", "http://127.0.0.1:8000"])
def test_an_exact_origin_is_accepted(origin):
    check_origins((origin,))


@pytest.mark.parametrize("origin", ["*", "https://*.example", "https://app.example/",
                                    "https://app.example/path", "app.example", "null",
                                    "ftp://app.example", "https://app.example?x=1",
                                    "https://app.example#top", "https://user@app.example",
                                    "https://app.example:99999", "https://app.example:http",
                                    "https://"])
def test_an_origin_that_is_not_one_exact_origin_is_refused(origin):
    with pytest.raises(ConfigError, match="is not one origin"):
        check_origins(("https://fine.example", origin))


# ---------------------------------------------------------------------- the Host


@pytest.mark.parametrize("header", [
    "127.0.0.1", "127.0.0.1:8000", "localhost", "localhost:8000", "LOCALHOST:8000",
    "localhost.", "localhost.:8000", "[::1]", "[::1]:8000", "127.0.0.53:80"])
def test_a_loopback_server_answers_a_loopback_host(header):
    check_host_header(header, "127.0.0.1")
    check_host_header(header, "::1")


@pytest.mark.parametrize("header", [
    None, "", "evil.example", "evil.example:8000", "localhost.evil.com", "localhost.evil.com:80",
    "127.0.0.1.evil.com", "localhost:8000@evil.example", "localhost:80:80", "::1", "[::1]x",
    "[::1]:http", "[::1", "localhost:", "localhost:123456", "10.0.0.1:8000", "0.0.0.0:8000",
    "localhost ", " localhost", "localhost\x00.evil.com", "[fe80::1]:80"])
def test_a_loopback_server_refuses_any_other_host(header):
    with pytest.raises(ApiError) as refused:
        check_host_header(header, "127.0.0.1")
    assert refused.value.status == 403 and refused.value.code == "forbidden_host"


def test_a_server_on_another_address_leaves_the_host_to_its_key():
    check_host_header("evil.example", "0.0.0.0")  # noqa: S104 (a key is required there)
