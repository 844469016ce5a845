"""What stands between the network and the model, before any request is read: the API
key, the host the server may bind, the Host a request may name, the origins a browser
may call from, and the headers every response carries.

- The key comes from a file (`--api-key-file`) or the `FRAGMENT_API_KEY` environment
  variable, never from the command line, where any user on the machine can read it
  (`ps`). It is compared in constant time.
- A server on a non-loopback address must have a key: without one, anyone who can reach
  the port can use the model.
- A loopback server answers only requests whose Host header names loopback. Without that
  check a web page the user visits could point its own domain at 127.0.0.1 (DNS
  rebinding) and read the API from the user's browser, key or none.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from fragment_llm.errors import ConfigError
from fragment_llm.safety.files import read_capped
from fragment_llm.serve.errors import ApiError

API_KEY_ENV = "FRAGMENT_API_KEY"
MIN_KEY_CHARS = 16
MAX_KEY_BYTES = 4096
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
# A Host header: a name or IPv4 address, or an IPv6 address in brackets; then maybe a port.
_HOST_HEADER = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]*))(?::[0-9]{1,5})?")

# Every response: no sniffing, no framing, no referrer, nothing cached. The page gets a
# content security policy that allows its own script and style and calls to this
# server only, so even injected markup could neither run script nor send data away.
COMMON_HEADERS = {
    "x-content-type-options": "nosniff", "x-frame-options": "DENY",
    "referrer-policy": "no-referrer", "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin", "cross-origin-resource-policy": "same-origin",
}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
API_POLICY = "default-src 'none'; frame-ancestors 'none'"


def is_loopback(host: str) -> bool:
    """`127.0.0.1`, `::1`, `localhost` (any 127/8 address too)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_api_key(key_file: Path | None, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The key from `key_file` (its first line) or $FRAGMENT_API_KEY; None for neither.

    Refused: an empty or short key (under 16 characters), one with control characters or
    spaces (a key that a header cannot carry whole), one over 4 KiB; a file that is not
    UTF-8, not a regular file (a FIFO would block), or a symlink."""
    if key_file is not None:
        raw = read_capped(key_file, MAX_KEY_BYTES, ConfigError)
        try:
            lines = raw.decode("utf-8").splitlines()[:1]
        except UnicodeDecodeError:
            raise ConfigError(f"the API key file {key_file} is not UTF-8 text") from None
        text, source = (lines[0].strip() if lines else ""), str(key_file)
    elif environ.get(API_KEY_ENV) is not None:
        text, source = environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}"
        if len(text) > MAX_KEY_BYTES:
            raise ConfigError(f"the API key in {source} is {len(text):,} characters; the "
                              f"limit is {MAX_KEY_BYTES:,}")
    else:
        return None
    if len(text) < MIN_KEY_CHARS:
        raise ConfigError(f"the API key in {source} is {len(text)} characters; it needs at "
                          f"least {MIN_KEY_CHARS}",
                          hint="make one with: python3 -c 'import secrets; "
                               "print(secrets.token_urlsafe(32))' > key.txt")
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ConfigError(f"the API key in {source} has spaces, control or non-ASCII "
                          f"characters", hint="use letters, digits and punctuation only")
    return text.encode("ascii")


def check_bind(host: str, api_key: bytes | None) -> None:
    """Refuse to serve a non-loopback address without a key."""
    if api_key is None and not is_loopback(host):
        raise ConfigError(f"--host {host} is reachable from other machines, and no API key "
                          f"is set", hint=f"pass --api-key-file FILE or set {API_KEY_ENV}, "
                                          f"or keep the default --host 127.0.0.1")


def check_origins(origins: tuple[str, ...]) -> None:
    """Each --cors-origin must be one exact origin: `scheme://host[:port]`, no `*`, no
    path (not even `/`: a browser's Origin header has none), no user, a port that is one."""
    for origin in origins:
        parts = urlsplit(origin)
        exact = (parts.scheme in ("http", "https") and parts.hostname and not parts.path
                 and not parts.query and not parts.fragment and "*" not in origin
                 and "@" not in parts.netloc and _has_valid_port(parts))
        if not exact:
            raise ConfigError(f"--cors-origin {origin!r} is not one origin like "
                              f"https://app.example:8443", hint="name each origin exactly; "
                                                               "'*' is never allowed")


def _has_valid_port(parts: SplitResult) -> bool:
    try:
        return parts.port is None or parts.port > 0  # .port raises past 65535 or for "x"
    except ValueError:
        return False


def check_key(authorization: str | None, api_key: bytes | None) -> None:
    """ApiError 401 unless `Authorization: Bearer <key>` holds the key (or none is set)."""
    if api_key is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest on bytes takes time that depends on the lengths only, never on
    # where the first wrong character is.
    given_bytes = given.strip().encode("utf-8", errors="replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, api_key):
        raise ApiError(401, "incorrect or missing API key: send Authorization: Bearer <key>",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def check_host_header(host_header: str | None, bound_host: str) -> None:
    """A loopback server answers only to a loopback Host (see the module docstring)."""
    if not is_loopback(bound_host):
        return
    name = _host_name(host_header or "")
    if not is_loopback(name):
        raise ApiError(403, "the Host header does not name this machine's loopback address",
                       code="forbidden_host")


def _host_name(host_header: str) -> str:
    """`'127.0.0.1:8000' -> '127.0.0.1'`, `'[::1]:80' -> '::1'`, `'localhost.' ->
    'localhost'`; "" for anything that is not `host[:port]` (`'localhost:80@evil'`)."""
    match = _HOST_HEADER.fullmatch(host_header)
    if match is None:
        return ""
    name = match["ipv6"] or match["name"]
    # The root's trailing dot names the same host: "localhost." is localhost.
    return name.removesuffix(".")
