"""Configuration: defaults, flags over the file, and one clear line with exit status 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

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
    ("[inventory]\ngpus = -1\n", "inventory.gpus"),
    ("[inventory]\nrdma_ports = \"eight\"\n", "inventory.rdma_ports"),
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


# -- one rule for every command: --config, else the service's file when it exists; flags over it ------------

def run_with_default_file(default: Path, *args: str, timeout: float = 30) -> subprocess.Popen:
    """`stoker ARGS` in its own process, with `default` as the service's file (/etc/stoker/stoker.toml
    on a node): only the constant naming it differs from the installed command."""
    code = (f"import stoker.config as c; c.DEFAULT_FILE = {str(default)!r}; from stoker.cli import main; "
            f"raise SystemExit(main({list(args)!r}))")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(90)
def test_run_reads_the_services_file_by_default_and_flags_win(tmp_path):
    """`stoker run` without --config ran on the defaults while `stoker check` read the service's file: the
    same node judged with two configurations. Now both read it; --hint-listen (checkpoint.listen) wins over
    the file's hint address, and the rest of the file holds (its /metrics address)."""
    from tests.conftest import free_port, wait_http

    metrics_port, file_hint_port, flag_hint_port = free_port(), free_port(), free_port()
    (tmp_path / "token").write_text("0123456789abcdef-test-token\n")
    default = tmp_path / "stoker.toml"
    default.write_text(f'[agent]\nlisten = "127.0.0.1:{metrics_port}"\n[gpu]\nenabled = false\n'
                       f'[checkpoint]\nlisten = "127.0.0.1:{file_hint_port}"\ntoken_file = "{tmp_path / "token"}"\n')
    proc = run_with_default_file(default, "run", "--hint-listen", f"127.0.0.1:{flag_hint_port}",
                                 "--sysfs-root", str(tmp_path), "--log-format", "json")
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/healthz", timeout=30)
        assert listening(flag_hint_port) and not listening(file_hint_port)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    assert f'"config_file": "{default}"' in err, err


def test_check_reads_the_same_file_and_a_simulated_node_does_not(tmp_path):
    default = tmp_path / "stoker.toml"
    default.write_text("[agent]\ninterval = 0.5\n")
    proc = run_with_default_file(default, "check", "--seconds", "0.1", "--sysfs-root", str(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert f"configuration: {default}" in out
    assert config.path_for(None, simulated=False) is None  # no service file on this machine: the defaults
    # the service's file names this node's mounts, probe targets and ports: not a simulated node's
    config.DEFAULT_FILE, before = str(default), config.DEFAULT_FILE
    try:
        assert config.path_for(None, simulated=False) == str(default)
        assert config.path_for(None, simulated=True) is None
        assert config.path_for("other.toml", simulated=True) == "other.toml"
    finally:
        config.DEFAULT_FILE = before


@pytest.mark.parametrize("command, option", [("run", "--listen"), ("check", "--seconds"),
                                             ("replay healthy", "--interval"), ("rules", "--runbook-base")])
def test_a_bad_flag_prints_the_subcommands_usage(command, option):
    """`stoker run --bogus` printed the top-level usage, which names none of run's options."""
    result = run_cli(*command.split(), "--bogus")
    command = command.split()[0]
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: stoker {command} ") and option in result.stderr, result.stderr
    assert f"stoker {command}: error: unrecognized arguments: --bogus" in result.stderr


def test_the_hint_api_address_has_a_flag():
    from stoker.cli import build_parser, overrides_from
    args = build_parser().parse_args(["run", "--hint-listen", "127.0.0.1:9999", "--interval", "2"])
    cfg = config.load(None, overrides_from(args))
    assert cfg.checkpoint.listen == "127.0.0.1:9999" and cfg.agent.interval == 2.0


@pytest.mark.parametrize("argv, listen", [
    (["--hint-listen", "127.0.0.1:9478"], "127.0.0.1:9478"),  # the default address, asked for by name
    (["--hint-listen", "127.0.0.1:9590"], "127.0.0.1:9590"),
    ([], "127.0.0.1:0"),  # nothing asked: a free port, so that simulated nodes run side by side
])
def test_a_simulated_node_serves_hints_where_the_flag_says(monkeypatch, argv, listen):
    """`stoker run --simulate --hint-listen 127.0.0.1:9478` served the hint API on a random port: the
    simulator took an address equal to the default for no choice at all, so a user who asked for the
    address that `stoker checkpoint` and `stoker.hints` reach by default (docs/JOBS.md) did not get it.
    The configuration the command would serve, and the one a reload (SIGHUP) gives, are checked
    without binding a port."""
    from stoker import cli
    seen: dict = {}

    def serve(cfg, platform, reload, path=None):
        seen["started"], seen["reloaded"] = cfg.checkpoint.listen, reload().checkpoint.listen
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    assert cli.main(["run", "--simulate", "healthy", *argv]) == 0
    assert seen == {"started": listen, "reloaded": listen}
