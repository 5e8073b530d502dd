"""Checkpoint hints through the HTTP API, the `stoker checkpoint` command and the Python helper,
against a real agent on the simulated node; and `stoker check` exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker import hints
from tests.conftest import free_port, start_agent_process, wait_http

pytestmark = pytest.mark.slow
TOKEN = "0123456789abcdef-test-token"


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hints")
    (tmp / "token").write_text(TOKEN + "\n")
    port, hint_port = free_port(), free_port()
    (tmp / "stoker.toml").write_text(f'[checkpoint]\ntoken_file = "{tmp / "token"}"\n'
                                     f'listen = "127.0.0.1:{hint_port}"\n')
    proc = start_agent_process("--simulate", "healthy", "--config", str(tmp / "stoker.toml"),
                               "--listen", f"127.0.0.1:{port}", "--interval", "0.5")
    wait_http(f"http://127.0.0.1:{port}/metrics")
    time.sleep(1.5)  # the NFS collector has seen the mounts
    yield {"metrics": f"http://127.0.0.1:{port}/metrics", "hints": f"http://127.0.0.1:{hint_port}",
           "token_file": str(tmp / "token")}
    proc.terminate()
    proc.wait(timeout=10)


def post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method="POST"),
                                    timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric(url: str, name: str, **labels) -> float | None:
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_metric(url: str, name: str, value: float, **labels) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(url, name, **labels) == value:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name}{labels} never became {value}; it is {metric(url, name, **labels)}")


def test_api_start_and_end(agent):
    start = f"{agent['hints']}/api/v1/checkpoints/start"
    status, body = post(start, {"path": "/mnt/checkpoints/run7/step100", "expected_bytes": 16 << 30})
    assert status == 200 and body["mountpoint"] == "/mnt/checkpoints"
    wait_metric(agent["metrics"], "stoker_checkpoint_in_progress", 1, mountpoint="/mnt/checkpoints")
    status, body = post(f"{agent['hints']}/api/v1/checkpoints/end",
                        {"mountpoint": "/mnt/checkpoints", "outcome": "completed"})
    assert status == 200 and body["duration_seconds"] >= 0
    wait_metric(agent["metrics"], "stoker_checkpoint_in_progress", 0, mountpoint="/mnt/checkpoints")
    assert metric(agent["metrics"], "stoker_checkpoints_total", mountpoint="/mnt/checkpoints",
                  outcome="completed") >= 1


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"])
def test_missing_or_wrong_token_is_401(agent, token):
    status, body = post(f"{agent['hints']}/api/v1/checkpoints/start", {"mountpoint": "/mnt/checkpoints"}, token)
    assert status == 401 and "token" in body["error"]


@pytest.mark.parametrize("body, raw, fragment", [
    (None, b"{not json", "not JSON"),
    ([], None, "JSON object"),
    ({}, None, "mountpoint"),
    ({"mountpoint": "relative/path"}, None, "absolute"),
    ({"mountpoint": "/mnt/checkpoints", "expected_bytes": -1}, None, "expected_bytes"),
])
def test_bad_requests_are_400_with_a_message(agent, body, raw, fragment):
    status, answer = post(f"{agent['hints']}/api/v1/checkpoints/start", body, raw=raw)
    assert status == 400 and fragment in answer["error"]


def test_unknown_mount_404_and_end_without_start_409(agent):
    status, answer = post(f"{agent['hints']}/api/v1/checkpoints/start", {"path": "/home/user/ckpt"})
    assert status == 404 and "/home/user/ckpt" in answer["error"]
    status, answer = post(f"{agent['hints']}/api/v1/checkpoints/end", {"mountpoint": "/mnt/data",
                                                                        "outcome": "completed"})
    assert status == 409


def test_metrics_port_does_not_serve_the_hint_api(agent):
    url = agent["metrics"].replace("/metrics", "/api/v1/checkpoints/start")
    request = urllib.request.Request(url, data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code in (404, 405)


def test_cli_command(agent):
    base = [sys.executable, "-m", "stoker", "checkpoint"]
    common = ["--url", agent["hints"], "--token-file", agent["token_file"]]
    started = subprocess.run(base + ["start", "--mountpoint", "/mnt/checkpoints"] + common,
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    wait_metric(agent["metrics"], "stoker_checkpoint_in_progress", 1, mountpoint="/mnt/checkpoints")
    ended = subprocess.run(base + ["end", "--mountpoint", "/mnt/checkpoints", "--outcome", "aborted"] + common,
                           capture_output=True, text=True, timeout=30)
    assert ended.returncode == 0, ended.stderr
    wait_metric(agent["metrics"], "stoker_checkpoints_total", 1, mountpoint="/mnt/checkpoints", outcome="aborted")
    refused = subprocess.run(base + ["end", "--mountpoint", "/mnt/checkpoints"] + common,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "no checkpoint in progress" in refused.stderr


def test_python_helper_context_manager(agent):
    kwargs = {"url": agent["hints"], "token": TOKEN}
    before = metric(agent["metrics"], "stoker_checkpoints_total", mountpoint="/mnt/checkpoints", outcome="completed")
    with hints.checkpoint(path="/mnt/checkpoints/run7/step200", **kwargs):
        wait_metric(agent["metrics"], "stoker_checkpoint_in_progress", 1, mountpoint="/mnt/checkpoints")
    wait_metric(agent["metrics"], "stoker_checkpoints_total", before + 1, mountpoint="/mnt/checkpoints",
                outcome="completed")
    with pytest.raises(RuntimeError):
        with hints.checkpoint(mountpoint="/mnt/checkpoints", **kwargs):
            raise RuntimeError("torch.save failed")
    wait_metric(agent["metrics"], "stoker_checkpoint_in_progress", 0, mountpoint="/mnt/checkpoints")


def test_python_helper_never_breaks_training_when_the_agent_is_away():
    with hints.checkpoint(mountpoint="/mnt/checkpoints", url=f"http://127.0.0.1:{free_port()}", token=TOKEN):
        pass  # no exception: the hint is logged and dropped


@pytest.mark.parametrize("scenario, code", [("healthy", 0), ("port-down", 1), ("gpu-lost", 1)])
def test_stoker_check_exit_codes(scenario, code):
    result = subprocess.run([sys.executable, "-m", "stoker", "check", "--simulate", scenario, "--seconds", "4"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert ("HEALTHY" if code == 0 else "UNHEALTHY") in result.stdout


def test_stoker_check_without_nvml_could_not_check(tmp_path):
    config = tmp_path / "stoker.toml"
    config.write_text("[rdma]\nenabled = false\n[netdev]\nenabled = false\n[nfs]\nenabled = false\n")
    result = subprocess.run([sys.executable, "-m", "stoker", "check", "--config", str(config), "--seconds", "2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "COULD NOT CHECK" in result.stdout
