"""The agent alone on the full simulated XE9680, beside the simulator's own cost.

Two processes, so that neither's CPU hides in the other's:

- the simulator (`--role simulator`) lays out the simulated kernel (8 RoCE ports with their
  counters and hw_counters, 2 NFS mounts in mountstats, PSI files, the NAS probe directories)
  and keeps it moving as `stoker run --simulate` does; its CPU is the simulator's cost per node.
- the agent (`--role agent`) is the real `Agent`, every collector on, production defaults
  (`[sim] shorten = false`: NAS probes every 15 s), reading that tree for real each cycle. The
  fake NVML, ethtool and netlink answer in process, as the drivers would (the fake NVML's time
  counts as the agent's, as the driver's would); the model behind the fake ethtool moves in a
  thread of its own whose CPU is not counted. A scrape with gzip every 15 s, as Prometheus does.

Reported: the agent's CPU as a share of one core, per collector (its worker thread's CPU plus
the families and rendering of its chunk on the event loop) and for the rest (the event loop, the
agent's own metrics, HTTP, the probe children); RSS; series; the simulator's CPU per node and
how many simulated nodes fit in a core. A reference in the same run: a bare asyncio loop ticking
at the same interval in a process of its own (what any Python agent costs before it does work).

    python -m bench.agent [--intervals 1 0.25] [--seconds 60] [--py-spy FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import threading
import time
import types
from pathlib import Path

from bench.common import process_cpu, rss_bytes, thread_sum_cpu

# The agent's process imports no more than this module needs (its RSS is measured): what only the
# harness needs is imported in the harness's functions.

SCENARIO = "healthy"
SCRAPE_EVERY = 15.0


# -- the simulator's process ------------------------------------------------------------------

def simulator_main(root: str, scenario: str, interval: float) -> None:
    """The simulated kernel, moving as `stoker run --simulate` moves it for an agent sampling every
    `interval` (once per cycle, or every ADVANCE_EVERY when cycles come faster; older trees: every
    ADVANCE_EVERY). Here the agent is in another process: the moves are not aligned with its cycles."""
    from stoker.sim import simulation

    sim = simulation.Simulation(scenario, root)
    period = simulation.ADVANCE_EVERY
    if hasattr(simulation.Simulation, "pause"):
        period = max(period, interval)
    Path(root, "sim.json").write_text(json.dumps({"started": sim.node.started, "period": period}))
    due = time.monotonic()
    while True:
        due += period
        time.sleep(max(0.0, due - time.monotonic()))
        sim.advance()


# -- the agent's process ----------------------------------------------------------------------

def thread_cpu() -> dict[str, float]:
    """CPU seconds of every live thread of this process, by name."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            cpu = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, TypeError, ValueError):
            continue
        out[t.name] = out.get(t.name, 0.0) + cpu
    return out


def thread_wakeups() -> dict[str, int]:
    """Voluntary context switches of every live thread, by name: each is a sleep and a wake-up,
    which on a virtual machine costs tens of microseconds (the timer or IPI exits to the host)."""
    out: dict[str, int] = {}
    for t in threading.enumerate():
        try:
            status = Path(f"/proc/self/task/{t.native_id}/status").read_text()
        except (OSError, TypeError):
            continue
        n = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("voluntary_ctxt_switches"))
        out[t.name] = out.get(t.name, 0) + n
    return out


def worker_seconds() -> dict[str, float]:
    """Time the sampling thread spent in each worker's calls, by worker name (one sampling thread
    for all); empty for older trees (a thread per collector, counted by thread)."""
    from stoker.agent import worker as w
    return {o.name: o.seconds for o in w.workers()} if hasattr(w, "workers") else {}


def children_cpu() -> float:
    """CPU of this process's children, live (from /proc) and reaped."""
    me, total = os.getpid(), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == me:
                total += thread_sum_cpu(int(entry))
        except OSError:
            continue  # gone meanwhile
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + r.ru_utime + r.ru_stime


class LoopAccount:
    """CPU spent on the event loop per collector: its families and their rendering, and the
    verdicts' update. Installed over what the agent calls, so the same harness measures older trees
    (which render after each cycle through `supervisor.render`)."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.current = "_agent"

    def add(self, name: str, seconds: float) -> None:
        self.cpu[name] = self.cpu.get(name, 0.0) + seconds

    def timed(self, name: str, fn):
        def call(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - t0)
        return call

    def install(self, agent) -> None:
        from stoker.agent import supervisor as sup

        if agent.verdicts is not None:
            agent.verdicts.update = self.timed("verdicts", agent.verdicts.update)
        set_source = getattr(agent.exposition, "set_source", None)
        if set_source is not None:  # chunks rendered when asked: time each source's render
            agent.exposition.set_source = lambda source, render: set_source(source, self.timed(source, render))
            return
        for c in agent.collectors:  # rendered after each cycle: families, then render, then the agent's own
            c.families = self._marking(c.name, self.timed(c.name, c.families))
        sup.render = self._marking(None, sup.render, add=True)
        agent.supervisor._render_self = self.timed("_agent", agent.supervisor._render_self)

    def _marking(self, name, fn, add: bool = False):
        def call(*args):
            if name is not None:
                self.current = name
            if not add:
                return fn(*args)
            t0 = time.thread_time()
            try:
                return fn(*args)
            finally:
                self.add(self.current, time.thread_time() - t0)
        return call


def _gc_clock() -> dict:
    """Seconds spent in each generation's garbage collections (all threads), and their count."""
    import gc
    spent: dict = {0: 0.0, 1: 0.0, 2: 0.0, "n0": 0, "n1": 0, "n2": 0}
    started: dict = {}

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[threading.get_ident()] = time.perf_counter()
        else:
            t0 = started.pop(threading.get_ident(), None)
            if t0 is not None:
                spent[info["generation"]] += time.perf_counter() - t0
                spent[f"n{info['generation']}"] += 1
    gc.callbacks.append(callback)
    return spent


class DriverAccount:
    """Time in the fake NVML's calls, which stands for the driver: the simulator's work done in the
    agent's process. Reported apart, so that the agent's own code can be told from its feed (on a
    real node the driver's time takes its place: 297 us a GPU a fast cycle on an H200)."""

    WAITS = ("nvmlEventSetWait",)  # blocks in the XID thread: not work

    def __init__(self, nvml) -> None:
        self.seconds = 0.0
        for name in dir(type(nvml)):
            if name.startswith("nvml") and name not in self.WAITS:
                setattr(nvml, name, self._timed(getattr(nvml, name)))

    def _timed(self, fn):
        def call(*args):
            t0 = time.perf_counter()  # the same clock the sampling thread shares its CPU by
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t0
        return call


def agent_platform(root: str, scenario: str, ports: int):
    """The simulated node's fakes, attached to the tree the simulator process keeps moving."""
    from stoker.agent.platform import Platform
    from stoker.sim.fake_nvml import FakeNVML
    from stoker.sim.network import FakeEthtool, SimLinks, SimNetwork
    from stoker.sim.node import SimNode
    from stoker.sim.storage import SimStorage

    info = json.loads(Path(root, "sim.json").read_text())
    node = SimNode(scenario, skip=time.monotonic() - info["started"])  # the simulator's scenario time
    network = SimNetwork(node, os.path.join(root, "sys"), ports)
    network._write_port = lambda port: None  # the simulator's process writes the files
    storage = SimStorage(node, os.path.join(root, "proc"), os.path.join(root, "nas"), "bench")
    nvml = FakeNVML(node)
    platform = Platform(nvml=nvml, links=SimLinks(network),
                        open_ethtool=lambda ifname: FakeEthtool(network, ifname))
    attached = types.SimpleNamespace(storage=storage, token_file=os.path.join(root, "hint-token"),
                                     state_file=os.path.join(root, "state.json"),
                                     sysfs_root=os.path.join(root, "sys"), procfs_root=os.path.join(root, "proc"))
    return platform, network, attached, info["period"], DriverAccount(nvml)


def move_network(network, period: float, stop: threading.Event) -> None:
    """The ethtool counters' model, advanced as the simulator advances the files (CPU not counted)."""
    while not stop.wait(period):
        network.advance()


async def agent_run(args) -> dict:
    from stoker import config, logs
    from stoker.agent.runtime import Agent
    from stoker.sim.simulation import Simulation

    logs.configure("json", level=40)
    platform, network, attached, period, driver = agent_platform(args.root, args.scenario, args.ports)
    # a state file, as the package keeps one (/var/lib/stoker/state.json): the verdicts save the job's level
    settings = {"listen": f"127.0.0.1:{args.port}", "interval": args.interval,
                "state_file": os.path.join(args.root, "state.json")}
    cfg = config.load(overrides={"agent": settings,
                                 "checkpoint": {"listen": "127.0.0.1:0"}, "sim": {"shorten": False}})
    cfg = Simulation.configure(attached, cfg)
    stop = threading.Event()
    mover = threading.Thread(target=move_network, args=(network, period, stop), name="bench-network-model",
                             daemon=True)
    mover.start()
    agent = Agent(cfg, platform)
    account = LoopAccount()
    account.install(agent)
    await agent.start()
    gc_time = _gc_clock()
    Path(args.root, "agent-ready").write_text(str(os.getpid()))
    await asyncio.sleep(args.warmup)
    cpu0, threads0, children0, loop0 = process_cpu(), thread_cpu(), children_cpu(), dict(account.cpu)
    workers0, driver0 = worker_seconds(), driver.seconds
    gc0 = dict(gc_time)
    wakeups0 = thread_wakeups()
    t0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    wall = time.monotonic() - t0
    cpu, threads, children, loop = process_cpu() - cpu0, thread_cpu(), children_cpu() - children0, account.cpu
    sampled = {k: v - workers0.get(k, 0.0) for k, v in worker_seconds().items()}
    driver_s = driver.seconds - driver0
    wakeups = {k: round((v - wakeups0.get(k, 0)) / wall, 1) for k, v in thread_wakeups().items()}
    stop.set()
    threads = {k: v - threads0.get(k, 0.0) for k, v in threads.items()}
    loop = {k: v - loop0.get(k, 0.0) for k, v in loop.items()}
    model = threads.pop(mover.name, 0.0)
    agent_cpu = cpu - model
    body = agent.exposition.body()
    # the sampling thread's CPU (wake-ups included), shared among the workers by the time their calls took
    lane_threads = sum(v for k, v in threads.items() if k.startswith("stoker-sampling"))
    busy = sum(sampled.values())
    sampled = {k: lane_threads * v / busy for k, v in sampled.items()} if busy > 0 else sampled
    driver_cpu = lane_threads * driver_s / busy if busy > 0 else 0.0  # the fake NVML's share of the lane
    collectors = {}
    workers = {f"stoker-{c.name}" for c in agent.collectors}  # older trees: a thread per collector
    for c in agent.collectors:
        worker = sampled[c.name] if c.name in sampled else threads.get(f"stoker-{c.name}", 0.0)
        collectors[c.name] = {"sampling_cpu_s": round(worker, 4), "loop_cpu_s": round(loop.get(c.name, 0.0), 4),
                              "share_of_one_core": round((worker + loop.get(c.name, 0.0)) / wall, 5)}
    counted = sum(v["sampling_cpu_s"] + v["loop_cpu_s"] for v in collectors.values())
    rest = agent_cpu - counted
    other_workers = {k: round(v, 4) for k, v in sampled.items() if k not in collectors and v > 0}
    result = {
        "interval_s": args.interval, "seconds": round(wall, 2), "scenario": args.scenario,
        "agent_share_of_one_core": round((agent_cpu + children) / wall, 5),
        "fake_nvml_share_of_one_core": round(driver_cpu / wall, 5),
        "agent_without_fake_nvml_share_of_one_core": round((agent_cpu + children - driver_cpu) / wall, 5),
        "process_share_of_one_core": round(agent_cpu / wall, 5),
        "collectors": collectors,
        "rest_share_of_one_core": round(rest / wall, 5),
        "rest": {"agent_self_metrics_s": round(loop.get("_agent", 0.0), 4),
                 "main_thread_other_s": round(threads.get("MainThread", 0.0) - sum(loop.values()), 4),
                 "other_workers_s": other_workers,
                 "other_threads_s": {k: round(v, 4) for k, v in threads.items()
                                     if k != "MainThread" and k not in workers and not k.startswith("stoker-sampling")
                                     and v > 0}},
        "threads_share_of_one_core": {k: round(v / wall, 5) for k, v in threads.items() if v > 0},
        "wakeups_per_second": {k: v for k, v in wakeups.items() if v and k != mover.name},
        "gc_share_of_one_core": {f"gen{g}": round((gc_time[g] - gc0[g]) / wall, 5) for g in (0, 1, 2)},
        "gc_collections": {f"gen{g}": gc_time[f"n{g}"] - gc0[f"n{g}"] for g in (0, 1, 2)},
        "probe_children_share_of_one_core": round(children / wall, 5),
        "network_model_thread_share_not_counted": round(model / wall, 5),
        "rss_bytes": rss_bytes(os.getpid()),
        "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        "exposition_bytes": len(body),
        "uvloop": type(asyncio.get_running_loop()).__module__.startswith("uvloop"),
    }
    await agent.stop()
    return result


def agent_main(args) -> None:
    result = asyncio.run(agent_run(args))  # as `stoker run` does
    Path(args.result).write_text(json.dumps(result))


# -- the reference: a bare event loop ticking at the same interval ------------------------------

def reference_main(interval: float, seconds: float, result: str) -> None:
    async def tick() -> float:
        loop = asyncio.get_running_loop()
        due = loop.time()
        await asyncio.sleep(1.0)
        cpu0, t0 = process_cpu(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
        return (process_cpu() - cpu0) / (time.monotonic() - t0)
    Path(result).write_text(json.dumps({"share_of_one_core": round(asyncio.run(tick()), 5)}))


# -- the harness ------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _python(tree: str | None, scratch: str) -> tuple[list[str], dict, str]:
    """The command, environment and directory to run this harness's roles in; with `tree`, on the
    `stoker` package of that source tree (a baseline unpacked with `git archive`)."""
    if not tree:
        return [sys.executable, "-m", "bench.agent"], dict(os.environ), str(REPO)
    where = Path(scratch, "tree")
    where.mkdir(exist_ok=True)
    for name, target in (("stoker", Path(tree, "stoker")), ("bench", REPO / "bench")):
        if not (where / name).exists():
            (where / name).symlink_to(target.resolve())
    return [sys.executable, "-m", "bench.agent"], {**os.environ, "PYTHONPATH": str(where)}, str(where)


def _wait_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(str(path))
        time.sleep(0.05)


def measure(interval: float, seconds: float, warmup: float = 5.0, scenario: str = SCENARIO, ports: int = 8,
            tree: str | None = None, py_spy: str | None = None) -> dict:
    import gzip
    import subprocess
    import tempfile
    import urllib.request

    from bench.scrape import free_port, wait_http
    with tempfile.TemporaryDirectory(prefix="stoker-bench-agent-") as root:
        cmd, env, cwd = _python(tree, root)
        root = os.path.join(root, "node")
        os.mkdir(root)
        sim = subprocess.Popen([*cmd, "--role", "simulator", "--root", root, "--scenario", scenario,
                                "--interval", str(interval)],
                               env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        agent = None
        try:
            _wait_file(Path(root, "sim.json"))
            port = free_port()
            result_file = os.path.join(root, "result.json")
            agent = subprocess.Popen([*cmd, "--role", "agent", "--root", root, "--scenario", scenario,
                                      "--ports", str(ports), "--port", str(port), "--interval", str(interval),
                                      "--warmup", str(warmup), "--seconds", str(seconds), "--result", result_file],
                                     env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _wait_file(Path(root, "agent-ready"))
            url = f"http://127.0.0.1:{port}/metrics"
            wait_http(url)
            time.sleep(warmup)
            sim_cpu0, t0 = thread_sum_cpu(sim.pid), time.monotonic()
            spy = None
            if py_spy:
                spy = subprocess.Popen([py_spy_binary(), "record", "-p", str(agent.pid), "-r", "1000", "-d",
                                        str(int(seconds) - 1), "-f", "raw", "-o", py_spy, "--nonblocking",
                                        "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            next_scrape = t0
            while agent.poll() is None and time.monotonic() - t0 < seconds:
                if time.monotonic() >= next_scrape:
                    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        gzip.decompress(resp.read())
                    next_scrape += SCRAPE_EVERY
                time.sleep(0.2)
            sim_share = (thread_sum_cpu(sim.pid) - sim_cpu0) / (time.monotonic() - t0)
            sim_rss = rss_bytes(sim.pid)
            _, err = agent.communicate(timeout=60)
            if agent.returncode != 0:
                raise RuntimeError(f"agent process failed: {err.decode()[-2000:]}")
            if spy is not None:
                spy.wait(timeout=60)
            result = json.loads(Path(result_file).read_text())
        finally:
            for proc in (agent, sim):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
    result["simulator_share_of_one_core"] = round(sim_share, 5)
    result["simulator_rss_bytes"] = sim_rss
    return result


def py_spy_binary() -> str:
    import shutil
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def reference(interval: float, seconds: float) -> float:
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ref.json")
        cmd, env, cwd = _python(None, tmp)
        subprocess.run([*cmd, "--role", "reference", "--interval", str(interval), "--seconds", str(seconds),
                        "--result", out], env=env, cwd=cwd, check=True)
        return json.loads(Path(out).read_text())["share_of_one_core"]


def run(intervals: list[float], seconds: float, warmup: float = 5.0, tree: str | None = None,
        py_spy: str | None = None, against: str | None = None) -> dict:
    """With `against` (another source tree, e.g. the last release unpacked with `git archive`), that
    tree is measured at the same time, side by side on the same machine, and the ratios reported."""
    runs = []
    for interval in intervals:
        spy = py_spy if interval == intervals[0] else None
        if against:
            import concurrent.futures
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                mine = pool.submit(measure, interval, seconds, warmup, tree=tree, py_spy=spy)
                theirs = pool.submit(measure, interval, seconds, warmup, tree=against)
                r, other = mine.result(), theirs.result()
            r["against"] = {"tree": against, **other}
            r["agent_share_over_against"] = round(r["agent_share_of_one_core"] / other["agent_share_of_one_core"], 3)
            r["simulator_share_over_against"] = round(
                r["simulator_share_of_one_core"] / other["simulator_share_of_one_core"], 3)
        else:
            r = measure(interval, seconds, warmup, tree=tree, py_spy=spy)
        r["reference_bare_loop_share"] = reference(interval, min(seconds, 10.0))
        runs.append(r)
    sim = runs[0]["simulator_share_of_one_core"]
    return {"scenario": SCENARIO, "tree": tree or "this tree", "runs": runs,
            "simulator_share_per_node": sim,
            "simulated_nodes_per_core": round(1.0 / sim, 1) if sim > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0, 0.25])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--tree", help="measure the package in this directory instead (a baseline's source tree)")
    parser.add_argument("--py-spy", metavar="FILE", help="also record the agent with py-spy (first interval)")
    parser.add_argument("--against", metavar="TREE", help="measure this source tree too, at the same time, and "
                        "report the ratios (e.g. the last commit: git archive HEAD stoker | tar -x -C DIR)")
    parser.add_argument("--out")
    parser.add_argument("--role", choices=["harness", "simulator", "agent", "reference"], default="harness",
                        help=argparse.SUPPRESS)
    for name in ("--root", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default=SCENARIO, help=argparse.SUPPRESS)
    parser.add_argument("--ports", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "simulator":
        simulator_main(args.root, args.scenario, args.interval)
    elif args.role == "agent":
        agent_main(args)
    elif args.role == "reference":
        reference_main(args.interval, args.seconds, args.result)
    else:
        if args.py_spy and not os.path.exists(py_spy_binary()):
            parser.error("py-spy is not installed (.venv/bin/pip install py-spy)")
        from bench.common import emit
        emit("agent", run(args.intervals, args.seconds, args.warmup, args.tree, args.py_spy, args.against), args.out)


if __name__ == "__main__":
    main()
