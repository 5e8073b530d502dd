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

bcrypt is slow by design (tens of ms): a verified (user, password) pair is
remembered, and a check runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ssl
from dataclasses import dataclass, field

import bcrypt
import yaml
from aiohttp import web

from stoker.config import ConfigError

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
CACHE_LIMIT = 1024


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _err(path: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"agent.web_config_file: {path}: {key}: {message}")


def load(path: str) -> WebConfig:
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"agent.web_config_file: cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"agent.web_config_file: {path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise _err(path, "(top)", "expected a mapping")
    unknown = set(doc) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise _err(path, sorted(unknown)[0], "unknown key")
    config = WebConfig()
    if doc.get("tls_server_config"):
        config.ssl_context = _tls(path, doc["tls_server_config"])
    for user, hashed in (doc.get("basic_auth_users") or {}).items():
        if not isinstance(hashed, str) or not hashed.startswith("$2"):
            raise _err(path, f"basic_auth_users.{user}", "not a bcrypt hash")
        config.users[str(user)] = hashed.encode()
    headers = (doc.get("http_server_config") or {}).get("headers") or {}
    config.headers = {str(k): str(v) for k, v in headers.items()}
    return config


def _tls(path: str, tls: dict) -> ssl.SSLContext:
    unknown = set(tls) - TLS_KEYS
    if unknown:
        raise _err(path, f"tls_server_config.{sorted(unknown)[0]}", "not supported")
    for key in ("cert_file", "key_file"):
        if not tls.get(key):
            raise _err(path, f"tls_server_config.{key}", "required with TLS")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS.get(tls.get("min_version", "TLS12"), ssl.TLSVersion.TLSv1_2)
    if tls.get("max_version"):
        context.maximum_version = VERSIONS[tls["max_version"]]
    try:
        context.load_cert_chain(tls["cert_file"], tls["key_file"])
    except (OSError, ssl.SSLError) as exc:
        raise _err(path, "tls_server_config.cert_file", f"cannot load the certificate and key: {exc}") from None
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH:
        raise _err(path, "tls_server_config.client_auth_type", f"one of {', '.join(CLIENT_AUTH)}")
    context.verify_mode = CLIENT_AUTH[auth]
    if tls.get("client_ca_file"):
        try:
            context.load_verify_locations(tls["client_ca_file"])
        except (OSError, ssl.SSLError) as exc:
            raise _err(path, "tls_server_config.client_ca_file", str(exc)) from None
    elif auth in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven"):
        raise _err(path, "tls_server_config.client_ca_file", f"required with {auth}")
    return context


def middleware(config: WebConfig):
    """Basic auth (when users are configured) and the configured response headers."""
    verified: dict[tuple[str, bytes], bool] = {}

    def check(user: str, password: str) -> bool:
        hashed = config.users.get(user)
        return hashed is not None and bcrypt.checkpw(password.encode(), hashed)

    @web.middleware
    async def guard(request: web.Request, handler):
        if config.users:
            user, password = _credentials(request.headers.get("Authorization", ""))
            key = (user, hashlib.sha256(password.encode()).digest())
            ok = verified.get(key)
            if ok is None:
                ok = await asyncio.to_thread(check, user, password)
                if len(verified) >= CACHE_LIMIT:
                    verified.clear()
                verified[key] = ok
            if not ok:
                return web.Response(status=401, text="Unauthorized\n",
                                    headers={"WWW-Authenticate": 'Basic realm="stoker"', **config.headers})
        response = await handler(request)
        response.headers.update(config.headers)
        return response

    return guard


def _credentials(header: str) -> tuple[str, str]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, password
