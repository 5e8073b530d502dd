"""Step hints: the job's side (`stoker.hints.Steps`) against a dead, a hung and a live agent, the
step endpoint of the hint API, and the framework adapters against stand-ins of their callback
protocols (torch, transformers and lightning are not installed, and must not be needed)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
import time
import types

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from stoker import hints
from stoker.config import CheckpointConfig, DetectConfig
from stoker.detect.checkpoint import CheckpointTracker
from stoker.detect.goodput import MAX_JOBS, GoodputLedger
from stoker.exporters.hints import make_hint_app
from stoker.sources.gpu import GpuSample, GpuSnapshot
from stoker.sources.jobs import JobSnapshot, Owner
from stoker.hints_adapters import huggingface, lightning, pytorch
from tests.conftest import free_port

TOKEN = "0123456789abcdef-test-token"


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


def timed_loop(reporter, n: int) -> tuple[float, float]:
    """(total seconds, slowest call) of n steps, as a training loop would call them."""
    slowest, start = 0.0, time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        reporter.step(i, tokens=4096)
        slowest = max(slowest, time.perf_counter() - t0)
    return time.perf_counter() - start, slowest


def warnings_of(caplog, fragment: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stoker.hints" and fragment in r.getMessage()]


# -- the training loop never blocks or raises ------------------------------------------------------

def test_a_dead_agent_costs_the_loop_nothing_and_warns_once(caplog):
    caplog.set_level(logging.WARNING, "stoker.hints")
    reporter = hints.Steps(url=dead_url(), token=TOKEN, flush_every=0.01, all_ranks=True)
    total, slowest = timed_loop(reporter, 5000)
    time.sleep(0.1)  # several flushes fail meanwhile
    more, slowest_more = timed_loop(reporter, 5000)
    assert total + more < 1.0 and max(slowest, slowest_more) < 0.05
    assert reporter.sent == 0 and reporter.dropped > 0
    assert len(warnings_of(caplog, "not delivered")) == 1  # one warning, however many batches are dropped
    started = time.monotonic()
    reporter.close(timeout=0.5)
    assert time.monotonic() - started < 1.0


def test_a_hung_agent_does_not_hold_the_loop_or_the_exit():
    """An agent that accepts connections and never answers: the sender waits, the loop does not."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)  # never accepted: the kernel completes the handshakes, nobody reads
    try:
        reporter = hints.Steps(url=f"http://127.0.0.1:{server.getsockname()[1]}", token=TOKEN, flush_every=0.01,
                               all_ranks=True, timeout=5.0)
        reporter.step(0)
        time.sleep(0.2)  # the first batch is now stuck in its request
        total, slowest = timed_loop(reporter, 5000)
        assert total < 1.0 and slowest < 0.05
        started = time.monotonic()
        reporter.close(timeout=0.3)
        assert time.monotonic() - started < 1.0
    finally:
        server.close()


def test_the_queue_is_bounded_and_drops_with_one_warning(caplog):
    caplog.set_level(logging.WARNING, "stoker.hints")
    reporter = hints.Steps(url=dead_url(), token=TOKEN, max_pending=100, flush_every=60, all_ranks=True)
    timed_loop(reporter, 1000)
    assert len(reporter._pending) == 100 and reporter.dropped == 900
    assert len(warnings_of(caplog, "queue is full")) == 1
    reporter.close(timeout=0.2)


def test_without_a_token_the_hints_turn_off_after_one_warning(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "stoker.hints")
    monkeypatch.delenv("STOKER_HINT_TOKEN", raising=False)
    reporter = hints.Steps(url=dead_url(), token_file=str(tmp_path / "missing"), flush_every=0.01, all_ranks=True)
    reporter.step(1)
    deadline = time.monotonic() + 5
    while reporter.enabled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not reporter.enabled
    timed_loop(reporter, 100)
    assert len(reporter._pending) == 0 and len(warnings_of(caplog, "disabled")) == 1
    reporter.close(timeout=0.2)


def test_only_local_rank_0_reports_by_default(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    reporter = hints.Steps(url=dead_url(), token=TOKEN)
    reporter.step(1)
    assert not reporter.enabled and reporter._thread is None and not reporter._pending
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert hints.Steps(url=dead_url(), token=TOKEN).enabled


def test_the_environment_names_the_job_its_run_and_its_gpus(monkeypatch):
    for key in ("STOKER_JOB_ID", "STOKER_RUN_ID", "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    reporter = hints.Steps(url=dead_url(), token=TOKEN)
    assert (reporter.job, reporter.scheduler, reporter.run) == ("4242", "slurm", "slurm:4242.0.1")
    assert reporter.gpus == ["GPU-aaaa", "GPU-bbbb"]
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # indexes in CUDA's order: not NVML's, not sent
    assert hints.Steps(url=dead_url(), token=TOKEN).gpus == []


def test_step_costs_about_a_microsecond():
    """Against a no-op loop of the same shape; generous bounds for a shared CI machine (measured
    figures: docs/JOBS.md)."""
    n = 200_000
    reporter = hints.Steps(url=dead_url(), token=TOKEN, max_pending=n + 1, flush_every=3600, all_ranks=True)
    reporter._thread = threading.current_thread()  # no sender: the cost of step() alone

    class NoOp:
        def step(self, step, tokens=None, samples=None, seconds=None):
            pass

    def loop(r):
        start = time.perf_counter()
        for i in range(n):
            r.step(i, 4096)
        return time.perf_counter() - start

    base = min(loop(NoOp()) for _ in range(3))
    cost = min(loop(reporter) - base for _ in range(1)) / n
    assert cost < 20e-6, f"{cost * 1e6:.2f} us per step"


# -- a live agent: the step endpoint ----------------------------------------------------------------

@pytest.fixture
async def agent():
    tracker = CheckpointTracker(CheckpointConfig())
    ledger = GoodputLedger(DetectConfig())
    server = TestServer(make_hint_app(tracker, TOKEN, ledger), host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", ledger
    finally:
        await server.close()


async def wait_until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert condition()


async def test_steps_reach_the_agent_in_batches(agent):
    url, ledger = agent
    reporter = hints.Steps(job="llama70b-7", run="launch-1", url=url, token=TOKEN, flush_every=0.05, all_ranks=True)
    for n in range(1, 301):
        reporter.step(n, tokens=4096, samples=2, seconds=1.5)
    await wait_until(lambda: "llama70b-7" in ledger.jobs and ledger.jobs["llama70b-7"].steps == 300)
    job = ledger.jobs["llama70b-7"]
    assert (job.tokens, job.samples, job.last_step, job.run) == (300 * 4096, 600, 300, "launch-1")
    assert job.step_seconds.total == pytest.approx(450.0)
    assert reporter.sent == 300 and reporter.dropped == 0
    await asyncio.to_thread(reporter.close, 1.0)


def test_the_launcher_says_how_many_nodes_the_job_spans(monkeypatch):
    """torchrun sets WORLD_SIZE and LOCAL_WORLD_SIZE (torch/distributed/elastic/agent/server/api.py); srun
    SLURM_STEP_NUM_NODES, sbatch SLURM_JOB_NUM_NODES (Slurm's srun(1), sbatch(1)); Open MPI
    OMPI_COMM_WORLD_SIZE and OMPI_COMM_WORLD_LOCAL_SIZE (mpirun(1))."""
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(key, raising=False)
    assert hints.Steps(url=dead_url(), token=TOKEN).nodes is None
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "32")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "16")  # the job step srun runs: 16 of the allocation's 32
    assert hints.Steps(url=dead_url(), token=TOKEN).nodes == 16
    monkeypatch.setenv("WORLD_SIZE", "128")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert hints.Steps(url=dead_url(), token=TOKEN).nodes == 16
    monkeypatch.setenv("WORLD_SIZE", "9" * 5000)  # garbage: the next source
    assert hints.Steps(url=dead_url(), token=TOKEN).nodes == 16
    monkeypatch.delenv("SLURM_STEP_NUM_NODES")
    assert hints.Steps(url=dead_url(), token=TOKEN, nodes=4).nodes == 4
    assert hints.Steps(url=dead_url(), token=TOKEN).nodes == 32


async def test_data_wait_and_the_node_count_reach_the_agent(agent):
    url, ledger = agent
    reporter = hints.Steps(job="ddp-16", run="launch-1", url=url, token=TOKEN, flush_every=0.05, all_ranks=True,
                           nodes=16)
    for n in range(1, 11):
        reporter.waited(0.25)
        reporter.waited(0.25)  # two micro-batches
        reporter.step(n, seconds=2.0)
    reporter.step(11, seconds=2.0, data_wait=1.5)
    reporter.step(12, seconds=2.0)  # no wait this step
    await wait_until(lambda: "ddp-16" in ledger.jobs and ledger.jobs["ddp-16"].steps == 12)
    job = ledger.jobs["ddp-16"]
    assert job.nodes == 16 and job.data_wait_seconds == pytest.approx(10 * 0.5 + 1.5)
    await asyncio.to_thread(reporter.close, 1.0)


async def post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/api/v1/steps", json=None if raw is not None else body, data=raw,
                                headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize("body, fragment", [
    ({}, "`steps` must be a list"),
    ({"steps": []}, "`steps` must be a list"),
    ({"steps": [{"seconds": 1}]}, "steps[0].step"),
    ({"steps": [{"step": -1}]}, "steps[0].step"),
    ({"steps": [{"step": True}]}, "steps[0].step"),
    ({"steps": [{"step": 2**53 + 1}], "job": "j"}, "steps[0].step"),  # past what the last-step gauge holds exactly
    ({"steps": [{"step": 1, "seconds": -2}]}, "steps[0].seconds"),
    ({"steps": [{"step": 1, "tokens": 1.5}]}, "steps[0].tokens"),
    ({"steps": [{"step": 1, "samples": 2**60}]}, "steps[0].samples"),
    ({"steps": [{"step": 1}], "job": "a b"}, "`job`"),
    ({"steps": [{"step": 1}], "job": 'x"}\n'}, "`job`"),
    ({"steps": [{"step": 1}], "job": "x" * 129}, "`job`"),
    ({"steps": [{"step": 1}], "job": "j", "pid": "12"}, "`pid`"),
    ({"steps": [{"step": 1}], "job": "j", "gpus": "GPU-1"}, "`gpus`"),
    ({"steps": [{"step": 1}], "job": "j", "scheduler": "pbs"}, "`scheduler`"),
    ({"steps": [{"step": 1}]}, "give `job`"),
    ({"steps": [{"step": 1, "seconds": 2, "data_wait": -1}], "job": "j"}, "steps[0].data_wait"),
    ({"steps": [{"step": 1, "data_wait": "0.5"}], "job": "j"}, "steps[0].data_wait"),
    ({"steps": [{"step": 1}], "job": "j", "nodes": 0}, "`nodes`"),
    ({"steps": [{"step": 1}], "job": "j", "nodes": 16.0}, "`nodes`"),
    ({"steps": [{"step": 1}], "job": "j", "nodes": 10**6}, "`nodes`"),
])
async def test_bad_step_hints_are_400_with_a_message(agent, body, fragment):
    status, answer = await post(agent[0], body)
    assert status == 400 and fragment in answer["error"], answer


async def test_step_hints_need_the_token_and_are_bounded_in_jobs(agent):
    url, ledger = agent
    assert (await post(url, {"steps": [{"step": 1}], "job": "j"}, token="wrong-token-wrong-token"))[0] == 401
    status, _ = await post(url, None, raw=b'{"steps": [{"step": 1, "seconds": NaN}], "job": "j"}')
    assert status == 400  # JSON's NaN is not a duration
    for n in range(MAX_JOBS):
        status, answer = await post(url, {"steps": [{"step": 1}], "job": f"j{n}"})
        assert status == 200 and answer == {"job": f"j{n}", "accepted": 1, "duplicates": 0}
    status, answer = await post(url, {"steps": [{"step": 1}], "job": "one-more"})
    assert status == 429 and "16 jobs" in answer["error"]
    assert len(ledger.jobs) == MAX_JOBS


def hold_the_gpus(ledger: GoodputLedger, job: str, pids=range(100, 108)) -> None:
    """One tick of the ledger with Slurm job `job` (its cgroup) on the 8 GPUs, one process each."""
    gpus = GpuSnapshot([GpuSample(i, f"GPU-{i}", up=True, processes=1, pids=(pid,), memory_used_bytes=50e9)
                        for i, pid in enumerate(pids)])
    ledger.tick(time.monotonic(), gpus, JobSnapshot({p: Owner(job, "slurm", "cgroup") for p in pids}), None, {})


async def test_a_step_hint_counts_for_the_job_it_names(agent, monkeypatch):
    """Issue 26: docs/JOBS.md's example, and the helper with $STOKER_JOB_ID, on a node where Slurm job
    3247075 holds the GPUs: both were counted for 3247075 (answer `{"job": "3247075"}`)."""
    url, ledger = agent
    hold_the_gpus(ledger, "3247075")
    status, answer = await post(url, {"job": "4242", "run": "slurm:4242.0.0", "pid": 81231, "gpus": ["GPU-5a0c"],
                                      "scheduler": "slurm", "steps": [{"step": 1200, "seconds": 1.92,
                                                                       "tokens": 4194304, "samples": 1024}]})
    assert (status, answer) == (200, {"job": "4242", "accepted": 1, "duplicates": 0})
    for key in ("SLURM_JOB_ID", "STOKER_RUN_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("STOKER_JOB_ID", "adapter-job")
    reporter = hints.Steps(url=url, token=TOKEN, flush_every=0.05, all_ranks=True)
    for n in range(1, 4):
        reporter.step(n)
    await wait_until(lambda: "adapter-job" in ledger.jobs and ledger.jobs["adapter-job"].steps == 3)
    await asyncio.to_thread(reporter.close, 1.0)
    status, answer = await post(url, {"job": "4242", "pid": 100, "steps": [{"step": 1201}]})
    assert status == 409 and "pid 100 is a process of job 3247075" in answer["error"], answer
    assert ledger.jobs["3247075"].steps == 0 and ledger.jobs["4242"].steps == 1


def test_the_token_is_its_text_less_one_trailing_newline_exactly(tmp_path, monkeypatch):
    """Issue 25: the token also matched with a trailing space (both ends stripped all whitespace)."""
    monkeypatch.delenv("STOKER_HINT_TOKEN", raising=False)
    path = tmp_path / "hint-token"
    for good in (TOKEN + "\n", TOKEN):
        path.write_text(good)
        assert hints._token(None, str(path)) == TOKEN
    for bad in (TOKEN + " \n", TOKEN + " ", TOKEN + "\n\n", TOKEN + "\r\n", " " + TOKEN, "\xe9" + TOKEN):
        path.write_text(bad)
        with pytest.raises(hints.HintFailed, match="printable ASCII without spaces"):
            hints._token(None, str(path))
    monkeypatch.setenv("STOKER_HINT_TOKEN", TOKEN + " ")
    with pytest.raises(hints.HintFailed, match="STOKER_HINT_TOKEN"):
        hints._token(None, None)
    path.write_text(TOKEN + " \n")  # the agent refuses the same file: exit 2, one line
    (tmp_path / "stoker.toml").write_text(f'[checkpoint]\ntoken_file = "{path}"\n')
    result = subprocess.run([sys.executable, "-m", "stoker", "run", "--config", str(tmp_path / "stoker.toml"),
                             "--simulate", "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "printable ASCII without spaces" in result.stderr, result.stderr[-2000:]


async def test_the_header_is_compared_exactly_after_http_drops_its_outer_spaces(agent):
    """RFC 9110 section 5.5: a field value has no leading or trailing whitespace, so `Bearer T ` is the
    header `Bearer T` to any HTTP server; inside it, nothing is forgiven."""
    host, port = agent[0].removeprefix("http://").split(":")
    body = b'{"job": "j", "steps": [{"step": 1}]}'

    async def status_of(value: bytes) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /api/v1/steps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\nAuthorization: %s\r\n\r\n%s"
                     % (len(body), value, body))
        answer = await reader.read()
        writer.close()
        return int(answer.split(b" ", 2)[1])

    token = TOKEN.encode()
    assert await status_of(b"Bearer " + token + b" ") == 200
    for wrong in (b"Bearer  " + token, b"Bearer " + token + b" x", b"Bearer " + token[:-1]):
        assert await status_of(wrong) == 401, wrong


async def test_the_checkpoint_endpoints_are_still_there_with_the_step_endpoint(agent):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{agent[0]}/api/v1/checkpoints/end", json={"mountpoint": "/x", "outcome": "done"},
                                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 400 and "outcome" in (await resp.json())["error"]


@pytest.mark.slow
def test_steps_through_a_real_agent_to_its_metrics(tmp_path):
    """The helper, the hint API and /metrics of an agent process on the simulated node, whose only
    job runs under Slurm: steps sent without a job id are that job's."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from stoker.sim.jobs import slurm_job_id
    from tests.conftest import start_agent_process, wait_http

    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "one-job.toml").write_text('shared_jobs = true\n[[steps]]\ngpu = "saturated"\nseconds = 600\n'
                                           'job = "train"\n')  # shared: the scenario's job id, not the node's
    port, hint_port = free_port(), free_port()
    (tmp_path / "stoker.toml").write_text(f'[checkpoint]\ntoken_file = "{tmp_path / "token"}"\n'
                                          f'listen = "127.0.0.1:{hint_port}"\n')
    proc = start_agent_process("--simulate", str(tmp_path / "one-job.toml"), "--config", str(tmp_path / "stoker.toml"),
                               "--listen", f"127.0.0.1:{port}", "--interval", "0.5")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        time.sleep(1.5)  # the job is on the GPUs
        reporter = hints.Steps(url=f"http://127.0.0.1:{hint_port}", token=TOKEN, run="e2e", flush_every=0.1,
                               all_ranks=True)
        for n in range(1, 21):
            reporter.step(n, tokens=1000, seconds=2.0)
        reporter.close(timeout=5)
        assert reporter.sent == 20
        job = slurm_job_id("train")
        deadline, values = time.monotonic() + 10, {}
        while time.monotonic() < deadline and values.get("stoker_job_steps_total") != 20:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            values = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples
                      if s.labels.get("job_id") == job and s.name.startswith("stoker_job_")
                      and s.labels.get("state", "productive") == "productive"}
            time.sleep(0.2)
        assert values["stoker_job_steps_total"] == 20 and values["stoker_job_tokens_total"] == 20_000
        assert values["stoker_job_step_seconds_sum"] == 40.0 and values["stoker_job_seconds_total"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_the_simulated_node_example_of_the_docs_works_as_written(tmp_path):
    """docs/JOBS.md, "On the simulated node": the shell lines run as written against `stoker run --simulate`,
    with the root from its log line and its metrics port."""
    import json
    import os
    import re
    from pathlib import Path

    from tests.conftest import start_agent_process, wait_http

    doc = (Path(__file__).parent.parent / "docs" / "JOBS.md").read_text()
    section = doc[doc.index("### On the simulated node"):]
    script = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    port = free_port()
    proc = start_agent_process("--simulate", "--listen", f"127.0.0.1:{port}", "--interval", "0.5")
    try:
        wait_http(f"http://127.0.0.1:{port}/metrics")
        deadline = time.monotonic() + 10
        while '"simulated node"' not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        line = next(json.loads(x) for x in proc.log().splitlines() if '"simulated node"' in x)
        script = re.sub(r"^root=\S+", f"root={line['root']}", script, flags=re.M).replace(":9477/", f":{port}/")
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        env.pop("STOKER_HINT_TOKEN", None)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                                timeout=60, env=env)
        # the steps reach the agent at once; /metrics shows them from its next cycle, which a person
        # typing the last line never beats, but a script can: its last line (the curl) again, for a while
        scrape = script.strip().splitlines()[-1]
        deadline = time.monotonic() + 10
        while not result.stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
            result = subprocess.run(["bash", "-c", scrape], capture_output=True, text=True, timeout=10, env=env)
        assert result.stdout.strip() == 'stoker_job_steps_total{job_id="my-test"} 100.0', result
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- adapters, against stand-ins of the frameworks' callback protocols --------------------------------

class Recording:
    """A reporter that keeps what it is told; `waited` adds up as `hints.Steps.waited` does."""

    def __init__(self):
        self.steps: list[tuple] = []
        self.waits: list[float | None] = []  # each step's data wait
        self.nodes = None
        self._waited = 0.0

    def waited(self, seconds):
        self._waited += seconds

    def step(self, step, tokens=None, samples=None, seconds=None, data_wait=None):
        self.steps.append((step, tokens, samples))
        self.waits.append(data_wait if data_wait is not None else (self._waited or None))
        self._waited = 0.0


class Broken:
    def step(self, *args, **kwargs):
        raise RuntimeError("the reporter is broken")


def test_adapters_import_no_framework():
    code = ("import sys, stoker.hints_adapters.pytorch, stoker.hints_adapters.huggingface, "
            "stoker.hints_adapters.lightning; print([m for m in ('torch', 'transformers', 'lightning', "
            "'pytorch_lightning') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


class FakeOptimizer:
    """`torch.optim.Optimizer`'s step post-hooks: hook(optimizer, args, kwargs) after each step()."""

    def __init__(self):
        self.hooks: dict[int, object] = {}

    def register_step_post_hook(self, hook):
        key = len(self.hooks)
        self.hooks[key] = hook
        return types.SimpleNamespace(remove=lambda: self.hooks.pop(key))

    def step(self):
        for hook in list(self.hooks.values()):
            hook(self, (), {})


def test_pytorch_optimizer_hook_and_loop_wrapper(caplog):
    rec = Recording()
    opt = FakeOptimizer()
    handle = pytorch.track_optimizer(opt, rec, start=100, tokens_per_step=8192)
    for _ in range(3):
        opt.step()
    handle.remove()
    opt.step()
    assert rec.steps == [(101, 8192, None), (102, 8192, None), (103, 8192, None)]
    rec = Recording()
    seen = []
    for n, batch in pytorch.steps(["a", "b", "c"], rec, samples_per_step=32):
        seen.append((n, batch, len(rec.steps)))  # step n is reported after its body, not before
    assert seen == [(1, "a", 0), (2, "b", 1), (3, "c", 2)] and [s[0] for s in rec.steps] == [1, 2, 3]
    caplog.set_level(logging.WARNING, "stoker.hints")
    broken = FakeOptimizer()
    pytorch.track_optimizer(broken, Broken())
    for _ in range(5):
        broken.step()  # training goes on
    assert len(warnings_of(caplog, "hook failed")) == 1


class SlowLoader:
    """A data loader whose batch `i` takes `waits[i]` seconds to come."""

    def __init__(self, waits):
        self.waits = waits

    def __iter__(self):
        for i, wait in enumerate(self.waits):
            time.sleep(wait)
            yield i


def test_pytorch_adapters_time_the_data_loader():
    """A step's data wait is the time the loop waited for its batches: `steps` times the loader it wraps;
    with `track_optimizer`, `timed(loader)` adds up the waits of the micro-batches of each optimizer step."""
    rec = Recording()
    for n, _ in pytorch.steps(SlowLoader([0.05, 0.0, 0.2]), rec):
        time.sleep(0.01)  # the step's compute
    assert [s[0] for s in rec.steps] == [1, 2, 3]
    assert rec.waits[0] == pytest.approx(0.05, abs=0.04) and rec.waits[2] == pytest.approx(0.2, abs=0.08)
    assert rec.waits[1] is None or rec.waits[1] < 0.04
    rec, opt = Recording(), FakeOptimizer()
    pytorch.track_optimizer(opt, rec)
    for i, _ in enumerate(pytorch.timed(SlowLoader([0.05, 0.05, 0.0, 0.0]), rec)):
        if i % 2 == 1:  # gradient accumulation over 2 batches
            opt.step()
    assert [s[0] for s in rec.steps] == [1, 2]
    assert rec.waits[0] == pytest.approx(0.1, abs=0.06) and (rec.waits[1] or 0.0) < 0.04


@pytest.fixture
def transformers_standin(monkeypatch):
    module = types.ModuleType("transformers")

    class TrainerCallback:  # transformers.TrainerCallback: every event a no-op
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *args, **kwargs: None
            raise AttributeError(name)

    module.TrainerCallback = TrainerCallback
    monkeypatch.setitem(sys.modules, "transformers", module)
    return module


def call_event(callbacks, event, args, state, control):
    """What transformers' CallbackHandler.call_event does."""
    for cb in callbacks:
        result = getattr(cb, event)(args, state, control, model=None, tokenizer=None, optimizer=None)
        if result is not None:
            control = result
    return control


def test_huggingface_callback(transformers_standin):
    rec = Recording()
    cb = huggingface.StokerCallback(reporter=rec)
    assert isinstance(cb, transformers_standin.TrainerCallback)
    args = types.SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=8, world_size=64)
    state = types.SimpleNamespace(global_step=1200, num_input_tokens_seen=5_000_000)  # resumed at step 1200
    control = object()
    assert call_event([cb], "on_train_begin", args, state, control) is control
    for _ in range(2):
        call_event([cb], "on_step_begin", args, state, control)
        state.global_step += 1
        state.num_input_tokens_seen += 2048 * 4096
        call_event([cb], "on_step_end", args, state, control)
        call_event([cb], "on_log", args, state, control)
    call_event([cb], "on_step_end", args, state, control)  # the same step again: not another one
    assert rec.steps == [(1201, 2048 * 4096, 2048), (1202, 2048 * 4096, 2048)]
    # the data wait: from the last step's end to the next step's begin, when the Trainer has fetched the
    # step's batches (transformers' Trainer._inner_training_loop: get_batch_samples, then on_step_begin)
    time.sleep(0.1)  # the Trainer fetches the next step's batches
    call_event([cb], "on_step_begin", args, state, control)
    time.sleep(0.02)  # forward, backward, optimizer
    state.global_step += 1
    call_event([cb], "on_step_end", args, state, control)
    assert rec.steps[-1][0] == 1203 and rec.waits[-1] == pytest.approx(0.1, abs=0.05)
    broken = huggingface.StokerCallback(reporter=Broken())
    call_event([broken], "on_train_begin", args, state, control)
    state.global_step += 1
    call_event([broken], "on_step_end", args, state, control)  # no exception reaches the Trainer


def test_lightning_callback_reports_optimizer_steps(monkeypatch):
    lightning_pkg, pytorch_pkg = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")

    class Callback:  # lightning.pytorch.Callback: hooks are no-op methods
        def on_train_start(self, trainer, pl_module):
            pass

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pass

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pass

    pytorch_pkg.Callback = Callback
    lightning_pkg.pytorch = pytorch_pkg
    monkeypatch.setitem(sys.modules, "lightning", lightning_pkg)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", pytorch_pkg)
    rec = Recording()
    cb = lightning.StokerCallback(reporter=rec, tokens_per_step=1 << 22)
    assert isinstance(cb, Callback)
    trainer = types.SimpleNamespace(global_step=0)
    cb.on_train_start(trainer, None)
    for batch_idx in range(8):  # gradient accumulation over 4 batches: 2 optimizer steps
        if batch_idx % 4 == 3:
            trainer.global_step += 1
        cb.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert rec.steps == [(1, 1 << 22, None), (2, 1 << 22, None)]
    # the data wait: from each batch's end to the next batch's start, which Lightning calls once the batch
    # is fetched (lightning/pytorch/loops/training_epoch_loop.py: next(data_fetcher), then
    # on_train_batch_start), over the batches of the optimizer step; the node count from the Trainer
    rec, trainer = Recording(), types.SimpleNamespace(global_step=0, num_nodes=4)
    cb = lightning.StokerCallback(reporter=rec)
    cb.on_train_start(trainer, None)
    for batch_idx in range(2):
        time.sleep(0.05)  # fetching the batch
        cb.on_train_batch_start(trainer, None, None, batch_idx)
        if batch_idx == 1:
            trainer.global_step += 1
        cb.on_train_batch_end(trainer, None, None, None, batch_idx)
    assert rec.steps == [(1, None, None)] and rec.waits == [pytest.approx(0.1, abs=0.05)] and rec.nodes == 4


def test_an_adapter_without_its_framework_says_so():
    with pytest.raises(ImportError, match="lightning.pytorch, pytorch_lightning"):
        lightning.StokerCallback(reporter=Recording())
