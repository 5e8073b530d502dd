"""TLS and basic auth on /metrics, with the exporter-toolkit web config; a real Prometheus scrapes it."""

from __future__ import annotations

import base64
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from stoker import config
from stoker.exporters import webconfig
from tests.conftest import free_port, need_binary, start_agent_process
from tests.servers import prometheus

PASSWORD = "s3cret-scrape-password"


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    subprocess.run([need_binary("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=stoker-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp / "key.pem"), "-out", str(tmp / "cert.pem")],
                   check=True, capture_output=True)
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    (tmp / "web.yml").write_text(
        f"tls_server_config:\n  cert_file: {tmp / 'cert.pem'}\n  key_file: {tmp / 'key.pem'}\n"
        f"basic_auth_users:\n  prometheus: {hashed}\n"
        "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    (tmp / "stoker.toml").write_text(f'[agent]\nweb_config_file = "{tmp / "web.yml"}"\n'
                                     '[checkpoint]\nlisten = "127.0.0.1:0"\n')
    port = free_port()
    agent = start_agent_process("--simulate", "healthy", "--config", str(tmp / "stoker.toml"),
                                "--listen", f"127.0.0.1:{port}")
    context = ssl.create_default_context(cafile=str(tmp / "cert.pem"))
    url = f"https://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            get(url, context, "prometheus", PASSWORD)
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    yield {"url": url, "port": port, "context": context, "ca": str(tmp / "cert.pem")}
    agent.terminate()
    agent.wait(timeout=10)


def get(url: str, context=None, user: str | None = None, password: str | None = None):
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), context=context, timeout=5) as resp:
        return resp.status, resp.read(), resp.headers


@pytest.mark.slow
def test_right_password_over_tls(tls_agent):
    status, body, headers = get(tls_agent["url"], tls_agent["context"], "prometheus", PASSWORD)
    assert status == 200 and b"stoker_gpu_up" in body and headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.slow
@pytest.mark.parametrize("user, password", [("prometheus", "wrong"), ("nobody", PASSWORD), (None, None)])
def test_wrong_or_missing_credentials_are_401(tls_agent, user, password):
    with pytest.raises(urllib.error.HTTPError) as err:
        get(tls_agent["url"], tls_agent["context"], user, password)
    assert err.value.code == 401 and "Basic" in err.value.headers["WWW-Authenticate"]


@pytest.mark.slow
def test_plain_http_is_refused_when_tls_is_on(tls_agent):
    with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
        get(f"http://127.0.0.1:{tls_agent['port']}/metrics", None, "prometheus", PASSWORD)


def http_errors():
    import http.client
    return http.client.HTTPException


@pytest.mark.slow
def test_real_prometheus_scrapes_over_tls_with_basic_auth(tls_agent):
    job = (f"    scheme: https\n    tls_config:\n      ca_file: {tls_agent['ca']}\n"
           f"    basic_auth:\n      username: prometheus\n      password: {PASSWORD}\n")
    static = f'      - targets: ["127.0.0.1:{tls_agent["port"]}"]\n'
    with prometheus([], static_configs=job + "    static_configs:\n" + static, job_body=True) as prom:
        result = prom.wait_for("stoker_gpu_sm_active_ratio", lambda r: len(r) == 8)
        assert result and prom.query('up{job="stoker"}')[0]["value"][1] == "1"


def test_web_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "web.yml"
    for text, fragment in [("tls_server_config:\n  cert_file: /nope\n  key_file: /nope\n", "cert_file"),
                           ("basic_auth_users:\n  prometheus: plaintext\n", "basic_auth_users.prometheus"),
                           ("tls_server_config:\n  cert_file: a\n", "key_file"),
                           ("surprise: 1\n", "surprise")]:
        bad.write_text(text)
        with pytest.raises(config.ConfigError) as err:
            webconfig.load(str(bad))
        assert fragment in str(err.value)
