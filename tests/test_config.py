"""Configuration: defaults, flags over the file, and one clear line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stoker import config


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stoker", *args], capture_output=True, text=True, timeout=30)


def test_defaults_are_valid_and_documented_port():
    cfg = config.load()
    assert cfg.agent.listen.endswith(":9477") and cfg.agent.interval == 1.0
    assert config.DEFAULT_PORT not in (9100, 9400, 9835)


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "stoker.toml"
    path.write_text('[agent]\ninterval = 5\nlisten = "127.0.0.1:1234"\n[gpu]\nslow_interval = 30\n')
    cfg = config.load(path, {"agent": {"interval": 0.5}})
    assert cfg.agent.interval == 0.5 and cfg.agent.listen == "127.0.0.1:1234" and cfg.gpu.slow_interval == 30.0


@pytest.mark.parametrize("body, key", [
    ("[agent]\nintervall = 1\n", "agent.intervall"),
    ("[agent]\ninterval = \"fast\"\n", "agent.interval"),
    ("[agent]\ninterval = -1\n", "agent.interval"),
    ("[gpu]\nenabled = 1\n", "gpu.enabled"),
    ("[agent]\nlisten = \"nowhere\"\n", "agent.listen"),
    ("[nope]\n", "nope"),
])
def test_config_error_names_the_key_and_exits_2(tmp_path, body, key):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    result = run_cli("run", "--config", str(path), "--simulate")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr


def test_unreadable_and_invalid_toml_exit_2(tmp_path):
    assert run_cli("run", "--config", str(tmp_path / "missing.toml")).returncode == 2
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\n")
    result = run_cli("run", "--config", str(broken))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_unknown_scenario_is_a_config_error():
    result = run_cli("run", "--simulate", "nosuch")
    assert result.returncode == 2 and "nosuch" in result.stderr


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("stoker ")
