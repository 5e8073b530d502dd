"""Checkpoint hints through the HTTP API, the `stoker checkpoint` command and the Python helper,
against a real agent on the simulated node; and `stoker check` exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stoker import hints
from tests.conftest import free_port, start_agent_process, wait_http
from tests.hung_mount import HungMount

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


def test_a_token_file_that_is_not_a_regular_file_fails_the_hint_without_blocking(tmp_path):
    """The client read its token file with open(): a FIFO there blocked `stoker checkpoint` and, worse,
    the training step that entered `hints.checkpoint()`, for good. It is read as the agent reads it
    (files.read_regular_within): refused at once, a clear error for the command (exit 2), a warning
    and nothing else for the training code. The subprocess timeout and the join are the proof."""
    fifo = tmp_path / "hint-token"
    os.mkfifo(fifo)
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "stoker", "checkpoint", "start", "--mountpoint", "/mnt/checkpoints",
                           "--url", url, "--token-file", str(fifo)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"stoker: cannot read the hint token from {fifo}: not a regular file\n"
    training = threading.Thread(target=lambda: hints.checkpoint(mountpoint="/mnt/checkpoints", url=url,
                                                                  token_file=str(fifo)).__enter__(), daemon=True)
    training.start()
    training.join(10)
    if training.is_alive():  # let the old code's open() go, so the thread ends
        with open(fifo, "w"):
            pass
    assert not training.is_alive(), "the training step blocked on the token file"


def test_a_token_file_past_the_agents_cap_is_refused_before_it_is_read_whole(tmp_path):
    """The agent refuses a token file over 1 MiB (config.MAX_FILE_BYTES); the client read any size
    whole and then called it a bad token. It reads at most the same cap, and says so."""
    big = tmp_path / "hint-token"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(hints.HintFailed, match="larger than 1 MiB"):
        hints.send("start", {"mountpoint": "/mnt/checkpoints"}, url=f"http://127.0.0.1:{free_port()}",
                   token_file=str(big))


def test_a_token_file_on_a_hung_mount_fails_the_hint_at_its_timeout(tmp_path, monkeypatch):
    """A token file on a hung NFS mount (tests/hung_mount.py) blocked the hint for as long as the server
    was away. The read is given up at the hint's own timeout, and a second hint while that read is
    still stuck fails at once instead of leaving another thread behind."""
    token = tmp_path / "hint-token"
    token.write_text(TOKEN + "\n")
    (tmp_path / "hint-token.hung").touch()
    mount = HungMount()
    monkeypatch.setattr(os, "open", mount.open)
    url = f"http://127.0.0.1:{free_port()}"
    try:
        with pytest.raises(hints.HintFailed, match=r"hint token from .*: no answer within 0.5 s"):
            hints.send("start", {"mountpoint": "/mnt/checkpoints"}, url=url, token_file=str(token), timeout=0.5)
        with pytest.raises(hints.HintFailed, match="still waiting for an earlier read of it"):
            hints.send("start", {"mountpoint": "/mnt/checkpoints"}, url=url, token_file=str(token), timeout=0.5)
        assert mount.waiting == 1
    finally:
        mount.release()


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
