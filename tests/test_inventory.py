"""Expected inventory: a node that comes up short of a GPU or an RDMA port is noticed.

Present GPUs are what NVML enumerates (nvmlDeviceGetCount, NVML API reference: "the number of
compute devices in the system"; a GPU that fails PCIe training at boot is not among them, one lost
after it was seen still is), answered here by the fake NVML over a simulated node of 7 GPUs;
present ports are the ports under class/infiniband (linux Documentation/ABI/stable/sysfs-class-infiniband),
read from the XE9680 fixture tree with one device taken out. The agent, its collectors, the state
file and the exposition run for real.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stoker import config
from stoker.agent.platform import Platform
from stoker.agent.runtime import Agent
from stoker.detect.state import StateStore
from stoker.sim.fake_nvml import FakeNVML
from stoker.sim.node import SimNode

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sysfs" / "xe9680"
OLD_STATE = {"pids": [101, 102], "level": 0.9, "saved": 1.0, "checkpoints": [], "verdict": None}
"""A state file as the agent wrote it before the inventory field existed."""


def sysfs_with_ports(root: Path, ports: int) -> str:
    """A sysfs tree whose class/infiniband holds the XE9680 fixture's first `ports` devices (one port
    each), linked to the fixture's device directories as the kernel links them to its own."""
    devices = sorted((FIXTURE / "class" / "infiniband").iterdir())[:ports]
    (root / "sys" / "class" / "infiniband").mkdir(parents=True)
    for device in devices:
        (root / "sys" / "class" / "infiniband" / device.name).symlink_to(device.resolve())
    return str(root / "sys")


def agent_on(root: Path, state: Path, has_gpus: int, has_ports: int, **inventory) -> Agent:
    """An agent on a node of `has_gpus` GPUs and `has_ports` ports (a sysfs tree under `root`), its
    state file `state`, `inventory` the configuration's [inventory]."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = config.load(overrides={
        "agent": {"listen": "127.0.0.1:0", "interval": 0.1, "sysfs_root": sysfs_with_ports(root, has_ports),
                  "state_file": str(state)},
        "inventory": inventory, **{k: {"enabled": False} for k in ("netdev", "nfs", "host", "detect")}})
    return Agent(cfg, Platform(nvml=FakeNVML(SimNode("healthy", gpu_count=has_gpus)), links=None, open_ethtool=None))


async def inventory_of(agent: Agent, keep: bool = False) -> dict[tuple[str, str], float]:
    """{(metric, kind): value} from the agent's exposition after a few cycles; `keep`: then write
    what it learned, as its background task does every 30 s."""
    await agent.start(serve_http=False)
    try:
        await asyncio.sleep(0.6)
        if keep:
            await asyncio.to_thread(agent.inventory.keep)
        body = agent.exposition.body().decode()
    finally:
        await agent.stop()
    return {(s.name, s.labels["kind"]): s.value for f in text_string_to_metric_families(body)
            if f.name.startswith("stoker_inventory_") for s in f.samples}


async def test_a_node_short_of_a_gpu_and_a_port_since_boot(tmp_path):
    """7 GPUs and 7 ports where the configuration says 8 GPUs and the state file that the node has
    shown 8 ports: present below expected for both, which StokerInventoryMissing pages on."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({**OLD_STATE, "inventory": {"rdma_port": 8}}))
    seen = await inventory_of(agent_on(tmp_path, state, has_gpus=7, has_ports=7, gpus=8))
    assert seen == {("stoker_inventory_expected", "gpu"): 8, ("stoker_inventory_present", "gpu"): 7,
                    ("stoker_inventory_expected", "rdma_port"): 8, ("stoker_inventory_present", "rdma_port"): 7}


async def test_the_first_start_learns_what_it_sees_and_a_later_start_is_held_to_it(tmp_path):
    """No number in the configuration: the first start keeps what it found in the state file, beside
    the job's state of an older agent (which still loads); a start with a GPU and two ports fewer is
    measured against it."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps(OLD_STATE))
    first = await inventory_of(agent_on(tmp_path / "boot1", state, has_gpus=8, has_ports=8), keep=True)
    assert first[("stoker_inventory_expected", "gpu")] == first[("stoker_inventory_present", "gpu")] == 8
    data = json.loads(state.read_text())
    assert data["inventory"] == {"gpu": 8, "rdma_port": 8}
    assert {k: data[k] for k in OLD_STATE} == OLD_STATE  # the job's fields kept as they were
    saved = StateStore(str(state), max_age=1e12).load()
    assert saved is not None and saved.pids == frozenset({101, 102}) and saved.level == 0.9

    second = await inventory_of(agent_on(tmp_path / "boot2", state, has_gpus=7, has_ports=6), keep=True)
    assert second == {("stoker_inventory_expected", "gpu"): 8, ("stoker_inventory_present", "gpu"): 7,
                      ("stoker_inventory_expected", "rdma_port"): 8, ("stoker_inventory_present", "rdma_port"): 6}
    assert json.loads(state.read_text())["inventory"] == {"gpu": 8, "rdma_port": 8}  # never lowered by itself

    # a number in the configuration wins over what was learned (a node with fewer devices on purpose)
    third = await inventory_of(agent_on(tmp_path / "boot3", state, has_gpus=7, has_ports=6, gpus=7))
    assert third[("stoker_inventory_expected", "gpu")] == 7


def test_saving_the_jobs_state_keeps_the_inventory(tmp_path):
    """Both live in one file: the job's state, saved every 30 s, must not drop the inventory."""
    state = tmp_path / "state.json"
    state.write_text(json.dumps({**OLD_STATE, "inventory": {"gpu": 8, "rdma_port": 8}}))
    StateStore(str(state), max_age=1e12).save(frozenset({7}), 0.5, [])
    data = json.loads(state.read_text())
    assert data["inventory"] == {"gpu": 8, "rdma_port": 8} and data["pids"] == [7] and data["level"] == 0.5


def test_an_unreadable_inventory_is_learned_afresh(tmp_path):
    from stoker.exporters.inventory import Inventory

    state = tmp_path / "state.json"
    for bad in ('{"inventory": "eight"}', '{"inventory": {"gpu": "8", "rdma_port": -1}}', "[1, 2]", "{"):
        state.write_text(bad)
        inventory = Inventory(config.InventoryConfig(), {"gpu": lambda: 8}, str(state))
        inventory.load()
        assert inventory.counts() == [("gpu", 8, 8)], bad
