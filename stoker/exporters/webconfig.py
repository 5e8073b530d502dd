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
where a mapping belongs, an unknown TLS version, a broken bcrypt hash, a value
YAML cannot build such as `!!timestamp x`) is one line naming the key and exit
status 2, never a traceback at start or a 500 on every request later. How logins
are checked is basicauth.py's business.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
from dataclasses import dataclass, field

from aiohttp import web

from stoker.config import ConfigError, read_text
from stoker.exporters.basicauth import OK, TOO_MANY, Logins

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
    text = read_text(path, KEY)
    if _depth(text) > MAX_DEPTH:
        raise ConfigError(f"{KEY}: {path}: not valid YAML: nested too deeply")
    doc = _parse(path, text)
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


def _parse(path: str, text: str):
    """The document as Python values. PyYAML composes the nodes, and they are built here, so that a
    value PyYAML cannot build (`!!timestamp x`, `!!bool maybe`, a date like 2024-02-30, an integer of
    5,000 digits) is an error naming its key; PyYAML's own builders let KeyError or AttributeError out."""
    import yaml  # here, not at the top: 1.7 MB of RSS an agent without a web configuration never needs

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError(f"{KEY}: {path}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{KEY}: {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    try:
        return None if node is None else _build(path, node, "(top)", yaml.constructor.SafeConstructor(), {})
    except RecursionError:
        raise ConfigError(f"{KEY}: {path}: not valid YAML: nested too deeply") from None


def _build(path: str, node, key: str, scalars, built: dict):
    """Mappings, sequences and scalars (YAML's plain types; no `!!set`, `!!omap` or tags of one's own).
    `built` holds what each node became: an alias is the same object, built once, so that anchors
    referring to anchors (a "billion laughs") stay as small as the text."""
    import yaml

    if id(node) in built:
        return built[id(node)]
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    if isinstance(node, yaml.ScalarNode):
        try:
            return scalars.construct_object(node)
        except Exception:  # whatever PyYAML's builder for that tag raises: ValueError, KeyError, AttributeError
            value = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            raise _err(path, key, f"{value!r} is not a valid {tag}") from None
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) or tag not in ("!!map", "!!seq"):
        raise _err(path, key, f"{tag} is not supported (a mapping, a list or a plain value)")
    if tag == "!!seq":
        built[id(node)] = items = []
        items.extend(_build(path, item, key, scalars, built) for item in node.value)
        return items
    try:
        scalars.flatten_mapping(node)  # merge keys (`<<: *defaults`)
    except yaml.YAMLError as exc:
        raise _err(path, key, " ".join(str(exc).split())) from None
    built[id(node)] = table = {}
    for key_node, value_node in node.value:
        name = _build(path, key_node, key, scalars, built)
        if isinstance(name, (list, dict)):
            raise _err(path, key, "a key must be a plain value, not a mapping or a list")
        table[name] = _build(path, value_node, name if key == "(top)" else f"{key}.{name}", scalars, built)
    return table


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


def secure(app: web.Application, config: WebConfig) -> None:
    """Basic auth (when users are configured) and the configured response headers on every answer of
    `app`. When the app shuts down, logins still waiting for bcrypt are turned away at once: before,
    SIGTERM during a flood of failing logins waited 26 s for each queued check to run."""
    logins = Logins(config.users, config.dummy) if config.users else None

    @web.middleware
    async def guard(request: web.Request, handler):
        if logins is not None:
            status = await logins.check(request.remote, request.headers.get("Authorization", ""))
            if status == TOO_MANY:
                return web.Response(status=status, text="Too many logins; try again later\n",
                                    headers={"Retry-After": "1", **config.headers})
            if status != OK:
                return web.Response(status=status, text="Unauthorized\n",
                                    headers={"WWW-Authenticate": 'Basic realm="stoker"', **config.headers})
        response = await handler(request)
        response.headers.update(config.headers)
        return response

    async def stop(app: web.Application) -> None:
        logins.close()

    app.middlewares.append(guard)
    if logins is not None:
        app.on_shutdown.append(stop)
