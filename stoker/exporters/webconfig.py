"""TLS and basic auth for /metrics, configured like Prometheus' exporter-toolkit web config.

Operators reuse the file they wrote for node_exporter:

    tls_server_config:
      cert_file: /etc/stoker/tls/node.crt
      key_file: /etc/stoker/tls/node.key
      client_auth_type: RequireAndVerifyClientCert   # optional, with client_ca_file
      client_ca_file: /etc/stoker/tls/ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...                          # bcrypt, as `htpasswd -nBC 10` writes
    http_server_config:
      headers:
        Strict-Transport-Security: max-age=31536000

Everything in the file is checked when the agent starts: a malformed file (a list
where a mapping belongs, an unknown TLS version, a broken bcrypt hash) is one
line naming the key and exit status 2, never a 500 on every request later.

bcrypt is slow by design (tens of ms a check), so basic auth is built to keep
the legitimate scraper fast while others guess:
- an unknown user costs the same bcrypt work as a known one (the password is
  checked against a dummy hash of the same cost), so user names cannot be found
  by timing;
- only verified (user, password) pairs are remembered: each user has one
  password, so the cache is as small as the user list and no stream of wrong
  guesses can evict the scraper's entry; a cached scrape never touches bcrypt;
- one check runs at a time (as in exporter-toolkit), in a thread off the event
  loop: failing logins queue behind each other and cost the node at most one
  core, which the training job's data loaders need more.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import ssl
import stat
from dataclasses import dataclass, field

import bcrypt
from aiohttp import web

from stoker.config import ConfigError, read_text

KEY = "agent.web_config_file"
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
HEADERS = {
    # exporter-toolkit's list, with the values it allows where it restricts them: the same file
    # must mean the same thing to both, and no header that HTTP itself depends on can be overridden.
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
BCRYPT_HASH = re.compile(
    # $2a$/$2b$/$2x$/$2y$, cost 04-31, 22 characters of salt and 31 of hash in bcrypt's base64; the
    # last character of each carries unused bits that must be zero, or bcrypt refuses the salt
    # ("Invalid salt" on every request) or no password can ever match the hash.
    r"\$2[abxy]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]")
DUMMY_TAIL = "Gs.OmItRLSyd00z9FRCFKOO8avkH0c2b369Y4CkF/VV7BdFTEcqd2"
"""Salt and hash of a password nobody has; an unknown user's password is checked against it."""
BCRYPT_SLOTS = 1
BCRYPT_MAX_BYTES = 72
"""bcrypt reads 72 bytes of a password; bcrypt 5 raises on longer ones instead of ignoring the rest."""


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    dummy: bytes = b""
    """A hash as costly as the costliest user's, for unknown users."""


def _err(path: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{KEY}: {path}: {key}: {message}")


def _mapping(path: str, key: str, value) -> dict:
    """A section that must be a mapping; absent or empty (`key:` alone) is an empty one."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, key, f"expected a mapping, got {_kind(value)}")
    return value


def _kind(value) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _unknown(path: str, prefix: str, table: dict, known: set[str], message: str) -> None:
    unknown = sorted(str(k) for k in table if k not in known)
    if unknown:
        raise _err(path, f"{prefix}{unknown[0]}", f"{message} (known: {', '.join(sorted(known))})")


MAX_DEPTH = 32
"""The web configuration is four levels deep; PyYAML's pure-Python parser takes seconds on thousands."""


def _depth(text: str) -> int:
    """An upper bound of the document's nesting: flow brackets outside quotes, or indentation."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
    indent = max((len(line) - len(line.lstrip(" -")) for line in text.splitlines()), default=0)
    return max(deepest, indent // 2)


def load(path: str) -> WebConfig:
    import yaml  # here, not at the top: 1.7 MB of RSS an agent without a web configuration never needs

    text = read_text(path, KEY)
    if _depth(text) > MAX_DEPTH:
        raise ConfigError(f"{KEY}: {path}: not valid YAML: nested too deeply")
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{KEY}: {path}: not valid YAML: nested too deeply") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date like 2024-02-30, a 5000-digit integer
        raise ConfigError(f"{KEY}: {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    doc = _mapping(path, "(top)", doc)
    _unknown(path, "", doc, {"tls_server_config", "basic_auth_users", "http_server_config"}, "unknown key")
    config = WebConfig()
    tls = _mapping(path, "tls_server_config", doc.get("tls_server_config"))
    if tls:
        config.ssl_context = _tls(path, tls)
    config.users = _users(path, _mapping(path, "basic_auth_users", doc.get("basic_auth_users")))
    if config.users:
        cost = max(int(hashed[4:6]) for hashed in config.users.values())
        config.dummy = f"$2b${cost:02d}${DUMMY_TAIL}".encode()
    config.headers = _headers(path, _mapping(path, "http_server_config", doc.get("http_server_config")))
    return config


def _users(path: str, table: dict) -> dict[str, bytes]:
    users = {}
    for user, hashed in table.items():
        key = f"basic_auth_users.{user}"
        if not isinstance(user, str) or ":" in user:
            raise _err(path, key, "a user name is a string without ':' (Basic auth splits on the first ':')")
        if not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            raise _err(path, key, "not a bcrypt hash (like $2y$10$ and 53 characters, as `htpasswd -nBC 10` "
                                  "writes it)")
        users[user] = hashed.encode()
    return users


def _headers(path: str, http: dict) -> dict[str, str]:
    _unknown(path, "http_server_config.", http, {"headers", "http2"}, "not supported")
    if not isinstance(http.get("http2", True), bool):
        raise _err(path, "http_server_config.http2", "expected true or false")  # accepted; served as HTTP/1.1
    headers = {}
    for name, value in _mapping(path, "http_server_config.headers", http.get("headers")).items():
        key = f"http_server_config.headers.{name}"
        if name not in HEADERS:
            raise _err(path, key, f"cannot be set (one of {', '.join(HEADERS)})")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _err(path, key, f"expected a string, got {_kind(value)}")
        value = str(value)
        allowed = HEADERS[name]
        if allowed is not None and value not in allowed:
            raise _err(path, key, f"one of {', '.join(allowed)}, got {value!r}")
        if not value.isprintable():
            raise _err(path, key, "must be one line of printable characters")
        headers[name] = value
    return headers


def _tls(path: str, tls: dict) -> ssl.SSLContext:
    _unknown(path, "tls_server_config.", tls, TLS_KEYS, "not supported")
    for key, value in tls.items():
        if not isinstance(value, str):
            raise _err(path, f"tls_server_config.{key}", f"expected a string, got {_kind(value)}")
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise _err(path, f"tls_server_config.{key}", "required with TLS")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = tls.get(key, default)
        if name not in VERSIONS:
            raise _err(path, f"tls_server_config.{key}", f"one of {', '.join(VERSIONS)}, got {name!r}")
        versions[key] = VERSIONS[name]
    if versions["max_version"] < versions["min_version"]:
        raise _err(path, "tls_server_config.max_version", "below min_version")
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH:
        raise _err(path, "tls_server_config.client_auth_type", f"one of {', '.join(CLIENT_AUTH)}, got {auth!r}")
    for key in ("cert_file", "key_file", "client_ca_file"):
        if tls.get(key):
            _regular(path, f"tls_server_config.{key}", tls[key])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = versions["min_version"]
    context.maximum_version = versions["max_version"]
    try:
        context.load_cert_chain(tls["cert_file"], tls["key_file"])
    except (OSError, ssl.SSLError) as exc:
        raise _err(path, "tls_server_config.cert_file", f"cannot load the certificate and key: {exc}") from None
    context.verify_mode = CLIENT_AUTH[auth]
    if tls.get("client_ca_file"):
        if auth == "NoClientCert":
            raise _err(path, "tls_server_config.client_ca_file", "set without a client_auth_type that asks for "
                                                                 "a client certificate")
        try:
            context.load_verify_locations(tls["client_ca_file"])
        except (OSError, ssl.SSLError) as exc:
            raise _err(path, "tls_server_config.client_ca_file", str(exc)) from None
    elif auth in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven"):
        raise _err(path, "tls_server_config.client_ca_file", f"required with {auth}")
    return context


def _regular(path: str, key: str, filename: str) -> None:
    """OpenSSL opens the file itself, blocking on a FIFO: only regular files get that far."""
    try:
        mode = os.stat(filename).st_mode
    except (OSError, ValueError) as exc:
        raise _err(path, key, f"cannot read {filename}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(mode):
        raise _err(path, key, f"{filename} is not a regular file")


def middleware(config: WebConfig):
    """Basic auth (when users are configured) and the configured response headers."""
    verified: set[tuple[str, bytes]] = set()
    slots = asyncio.Semaphore(BCRYPT_SLOTS)

    def check(user: str, password: bytes) -> bool:
        hashed = config.users.get(user)
        matches = bcrypt.checkpw(password, hashed if hashed is not None else config.dummy)
        return matches and hashed is not None

    async def authenticate(user: str, password: bytes) -> bool:
        key = (user, hashlib.sha256(password).digest())
        if key in verified:
            return True
        async with slots:
            ok = await asyncio.to_thread(check, user, password)
        if ok:
            verified.add(key)
        return ok

    @web.middleware
    async def guard(request: web.Request, handler):
        if config.users:
            credentials = _credentials(request.headers.get("Authorization", ""))
            if credentials is None or not await authenticate(*credentials):
                return web.Response(status=401, text="Unauthorized\n",
                                    headers={"WWW-Authenticate": 'Basic realm="stoker"', **config.headers})
        response = await handler(request)
        response.headers.update(config.headers)
        return response

    return guard


def _credentials(header: str) -> tuple[str, bytes] | None:
    """User and password of a Basic Authorization header (the password cut to what bcrypt reads),
    or None when there is none: no user name, so nothing to hide by spending bcrypt on it."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        if not sep:
            return None
        return user.decode(), password[:BCRYPT_MAX_BYTES]
    except (binascii.Error, UnicodeDecodeError):
        return None
