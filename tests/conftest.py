"""Shared fixtures: a manual clock, the fake NVML over a simulated node, a running agent."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp
import pytest
import structlog

from stoker.sim.drive import ManualClock
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.node import SimNode


FUZZ_SEED = "hypothesis_seed"  # the dest of hypothesis' own --hypothesis-seed option


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Fuzzing (hypothesis: tests/test_fuzz.py and every @given) draws a new seed each run, unless
    --hypothesis-seed gives one; the seed is printed in the header and with every failure, so
    `--hypothesis-seed=N` replays it. Set before hypothesis' own plugin reads the option. Under
    pytest-xdist a worker takes the seed its controller drew and printed (pytest_configure_node),
    not one of its own."""
    worker_seed = getattr(config, "workerinput", {}).get(FUZZ_SEED)
    if worker_seed is not None:
        config.option.hypothesis_seed = worker_seed
    elif config.getoption(FUZZ_SEED, None) is None:
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(1 << 32))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: hand the controller's seed to each worker it starts."""
    node.workerinput[FUZZ_SEED] = node.config.getoption(FUZZ_SEED, None)


def pytest_report_header(config):
    seed = config.getoption(FUZZ_SEED, None)
    return [f"fuzz seed {seed}: replay with --hypothesis-seed={seed}"] if seed is not None else []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        seed = item.config.getoption(FUZZ_SEED, None)
        report.sections.append(("fuzz seed", f"replay with --hypothesis-seed={seed}"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def fake(clock) -> FakeNVML:
    return FakeNVML(SimNode("healthy", clock=clock))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; the test command must install it")
        pytest.skip(f"{name} is not installed")
    return path


async def fetch(url: str, **kwargs) -> tuple[int, bytes, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, **kwargs) as resp:
            return resp.status, await resp.read(), dict(resp.headers)


async def simulated_exposition(tmp_path, scenario: str, **sections) -> bytes:
    """/metrics of a whole agent in this process on the simulated node, after a few 0.2 s cycles;
    `sections`: configuration overrides (e.g. rdma={"hw_counters": "all"})."""
    import asyncio

    from stoker import config
    from stoker.agent.runtime import Agent
    from stoker.sim.simulation import Simulation

    sim = Simulation(scenario, str(tmp_path))
    cfg = sim.configure(config.load(overrides={"agent": {"listen": "127.0.0.1:0", "interval": 0.2}, **sections}))
    agent = Agent(cfg, sim.platform())
    await agent.start()
    try:
        await asyncio.sleep(1.5)
        status, body, _ = await fetch(f"http://127.0.0.1:{agent.port}/metrics")
    finally:
        await agent.stop()
    assert status == 200
    return body


AGENT_LOGS: list[str] = []


@pytest.fixture(autouse=True)
def structlog_defaults():
    """Each test starts with structlog's defaults: the CLI run in-process (`stoker check`, `replay`)
    configures it for the rest of the process (errors only), which would hide a later test's lines."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True, scope="session")
def remove_agent_logs():
    """The agents' log files go when the session ends (a failing test still has them to show)."""
    yield
    for path in AGENT_LOGS:
        with contextlib.suppress(OSError):
            os.unlink(path)


def start_agent_process(*args: str, env: dict | None = None, module: str = "stoker",
                        command: str = "run") -> subprocess.Popen:
    """The agent as its own process; its log goes to a file (`proc.log()` reads it),
    never to an unread pipe that would fill up and block it. `module`: what `python -m` runs
    (tests/hung_mount.py runs the agent with files on a hung mount); `command`: `stoker run`'s, or
    `cluster` (a simulated cluster's agents)."""
    log = tempfile.NamedTemporaryFile(prefix="stoker-agent-", suffix=".log", delete=False)
    AGENT_LOGS.append(log.name)
    proc = subprocess.Popen([sys.executable, "-m", module, command, *args],
                            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
    log.close()
    proc.log = lambda: open(log.name).read()  # type: ignore[attr-defined]
    return proc


def wait_http(url: str, timeout: float = 20.0) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")
