"""The benchmark harnesses run and their output parses (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import pytest

from bench import gpu_cycle, nvml_check, scrape


def test_gpu_cycle_harness():
    result = gpu_cycle.run(cycles=5)
    assert result["gpus"] == 8 and result["cycle_cpu_with_fake"]["n"] == 5
    assert result["collector_over_fake"] > 0


@pytest.mark.slow
def test_scrape_harness_with_the_python_client():
    result = scrape.run(concurrency=2, requests=20, client="python", rounds=1)
    assert result["metrics"]["n"] == 20 and result["series"] > 200
    assert result["agent_rss_bytes"] > 0
    process = result["process_metrics"]
    assert process["series"] == 6 and process["p99_ms_on_over_off"] > 0 and process["collect_and_render"]["ours_us"] > 0


@pytest.mark.slow
def test_peer_harness_against_node_exporter():
    from bench import peer
    result = peer.run(concurrencies=[2], requests=20, client="python", cycles=3)
    row = result["scrapes"][0]
    assert row["stoker"]["n"] == 20 and row["node_exporter"]["n"] == 20
    assert row["p99_ratio_stoker_over_node_exporter"] > 0


@pytest.mark.slow
def test_mountstats_harness_against_node_exporter():
    from bench import mountstats
    result = mountstats.run(cycles=3)
    assert result["node_exporter_collector_duration"]["n"] == 3
    assert result["ratio_stoker_over_node_exporter_p50"] > 0


@pytest.mark.slow
def test_cost_detection_fleet_and_report_harnesses(tmp_path):
    import json

    from bench import cost, detection, fleet, report
    results = tmp_path / "results"
    results.mkdir()
    c = cost.run(seconds=2, sizes=[1, 2], cycles=2)
    assert c["scaling"][1]["size"] == 2 and c["agent"][0]["rss_bytes"] > 0
    d = detection.run(["storage-starved"], ["storage-starved"], for_scale=0.02, scrape="1s", timeout=60)
    assert d["scenarios"][0]["verdict_after_fault_s"] >= 0 and "alert_after_fault_s" in d["scenarios"][0]
    f = fleet.run([1, 2], per_process=2, seconds=8, scrape_interval="2s")
    assert f["sizes"][1]["nodes_up"] == 2 and f["sizes"][1]["series_per_node"] > 100
    peer = {"client": "python", "tree": "t", "scrapes": [{"concurrency": 1, "p99_ratio_stoker_over_node_exporter": 0.5,
            **{k: {"p50_ms": 1, "p99_ms": 2, "cpu_s_per_1000_scrapes": 0.1, "rss_bytes": 1e7}
               for k in ("node_exporter", "stoker")}}]}
    for name, data in (("cost", c), ("detection", d), ("fleet", f), ("peer", peer)):
        (results / f"{name}.json").write_text(json.dumps(data))
    text = report.run(results, tmp_path)
    assert "## Fleet scale" in text and "## Detection latency" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {"bench-peer.png", "bench-scaling.png",
                                                        "bench-detection.png", "bench-fleet.png"}


@pytest.mark.slow
def test_agent_alone_harness_and_its_report(tmp_path):
    from bench import agent, report
    result = agent.run([1.0], seconds=2, warmup=1)
    r = result["runs"][0]
    assert r["series"] > 500 and r["rss_bytes"] > 0 and r["simulator_share_of_one_core"] >= 0
    assert {"gpu", "rdma", "netdev", "nfs", "host", "nasprobe", "verdicts"} <= set(r["collectors"])
    assert r["agent_share_of_one_core"] > 0 and r["reference_bare_loop_share"] >= 0
    results = tmp_path / "results"
    results.mkdir()
    (results / "agent.json").write_text(__import__("json").dumps(result))
    assert "## The agent alone" in report.run(results, tmp_path)


SMI_XML = """<?xml version="1.0" ?>
<nvidia_smi_log><driver_version>550.54.15</driver_version>
<gpu id="00000000:18:00.0"><uuid>GPU-aaaa</uuid>
<pci><replay_counter>3</replay_counter></pci>
<fb_memory_usage><total>143771 MiB</total><used>1024 MiB</used></fb_memory_usage>
<utilization><gpu_util>87 %</gpu_util></utilization>
<ecc_errors><volatile><sram_correctable>1</sram_correctable><sram_uncorrectable>0</sram_uncorrectable>
<dram_correctable>2</dram_correctable><dram_uncorrectable>0</dram_uncorrectable></volatile></ecc_errors>
<remapped_rows><remapped_row_corr>4</remapped_row_corr><remapped_row_unc>0</remapped_row_unc>
<remapped_row_pending>No</remapped_row_pending><remapped_row_failure>No</remapped_row_failure></remapped_rows>
<temperature><gpu_temp>51 C</gpu_temp><memory_temp>N/A</memory_temp></temperature>
<gpu_power_readings><average_power_draw>512.30 W</average_power_draw><instant_power_draw>530.00 W</instant_power_draw>
<enforced_power_limit>700.00 W</enforced_power_limit></gpu_power_readings>
<clocks><sm_clock>1980 MHz</sm_clock></clocks>
<clocks_event_reasons><clocks_event_reason_gpu_idle>Not Active</clocks_event_reason_gpu_idle>
<clocks_event_reason_sw_power_cap>Active</clocks_event_reason_sw_power_cap></clocks_event_reasons>
<processes><process_info><pid>4242</pid><type>C</type></process_info></processes>
</gpu></nvidia_smi_log>"""


def test_nvml_check_reads_nvidia_smi_and_compares_with_tolerances():
    """The real-hardware check (bench/nvml_check.py) without a GPU: its parsers on nvidia-smi's
    formats and its comparison on a sample the collector could have taken."""
    from stoker.sources.gpu import GpuSample

    smi = nvml_check.parse_smi_xml(SMI_XML)["GPU-aaaa"]
    assert smi["utilization_ratio"] == 0.87 and smi["memory_total_bytes"] == 143771 * 2**20
    assert smi["ecc_corrected"] == 3 and smi["remapped_correctable"] == 4 and smi["remapped_pending"] == 0
    assert "temperature_memory" not in smi and smi["reason:sw_power_cap"] == 1 and smi["processes"] == 1
    assert nvml_check.parse_dmon_line("20:01:02    0    1200    340") == ("20:01:02", 0, 1.2e9, 3.4e8)
    assert nvml_check.parse_dmon_line("#Time        gpu   rxpci   txpci") is None
    nvlink = nvml_check.parse_nvlink_counters("GPU 0: NVIDIA H200 (UUID: GPU-aaaa)\n"
                                              "\t Link 0: Data Tx: 1000 KiB\n\t Link 0: Data Rx: 10 KiB\n"
                                              "\t Link 1: Data Tx: 24 KiB\n\t Link 1: Data Rx: 0 KiB\n")
    assert nvlink == {0: (10 * 1024, 1024 * 1024)}
    before = GpuSample(0, "GPU-aaaa", pcie_rx_bytes=0.0, throttle_seconds={"sw_power_cap": 3.0})
    mine = GpuSample(0, "GPU-aaaa", utilization=0.9, memory_used_bytes=1100 * 2**20,
                     memory_total_bytes=143771 * 2**20, power_watts=528.0, power_limit_watts=700.0,
                     temperature={"gpu": 52.0}, sm_clock_hertz=1.98e9, processes=1, pcie_replays=3,
                     ecc_errors={"corrected": 3.0, "uncorrected": 0.0}, pcie_rx_bytes=1.2e9,
                     remapped_rows={"correctable": 4.0, "uncorrectable": 0.0, "pending": 0.0, "failure": 0.0},
                     throttle_seconds={"sw_power_cap": 4.0})
    comparison = nvml_check.Comparison()
    comparison.compare("GPU-aaaa", nvml_check.collector_values(mine, before, 1.0), smi)
    comparison.add("GPU-aaaa", "pcie_rx_bytes_per_second", 1.2e9, 1.25e9)
    report = comparison.report()
    assert report["all_agree"], report
    comparison.compare("GPU-aaaa", {"utilization_ratio": 0.2}, smi)
    report = comparison.report()
    assert not report["agree"]["utilization_ratio"] and report["fields"]["utilization_ratio"]["GPU-aaaa"]["n"] == 2


@pytest.mark.slow
def test_floods_harness_against_node_exporter():
    from bench import floods
    result = floods.run(seconds=2, scale=0.05, only=["logins/auth"])
    row = result["runs"][0]
    assert (row["flood"], row["web"], row["clients"]) == ("logins", "auth", 13)
    for name in ("stoker", "node_exporter"):
        assert row[name]["tried"] > 0 and row[name]["peak"]["fds"] > 0 and row[name]["sigterm_s"] >= 0


def test_mutation_harness_makes_one_change_at_a_time_and_patches_in_place():
    import types

    from bench import mutation
    source = '"""Doc 1."""\nLIMIT = 2\n\n\ndef over(x: int) -> bool:\n    """Past 3?"""\n    return x > LIMIT and not x < 0\n'
    found = mutation.mutants(source) + mutation._not_mutants(source)
    assert sorted(d for _, d, _ in found) == ["0 -> 1", "2 -> 3", "And -> Or", "Gt -> GtE", "Lt -> LtE", "not x -> x"]
    module = types.ModuleType("m")
    module.__file__ = "m.py"
    exec(compile(source, "m.py", "exec"), module.__dict__)
    over = module.over
    mutation.apply(module, dict((d, m) for _, d, m in found)["Gt -> GtE"])
    assert module.over is over and over(2), "the same function, the mutant's code"


def test_multinode_vm_harness_evaluates_the_shipped_rules_on_its_synthetic_fleet(tmp_path):
    """bench/multinode_vm.py: the groups it gives vmalert are the shipped rules (vmalert -dryRun takes them), and
    its synthetic fleet holds what they read: 8 GPUs, 5 causes and 7 states per node, step hints for half the jobs."""
    import json
    import subprocess

    from bench import multinode_vm
    from tests.conftest import need_binary

    rules = tmp_path / "rules.yml"
    rules.write_text(multinode_vm.rule_file())
    run = subprocess.run([need_binary("vmalert"), "-dryRun", f"-rule={rules}", "-loggerLevel=ERROR"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    series = multinode_vm.synthetic(nodes=40, jobs=4, sites=2)
    names = [json.loads(labels)["__name__"] for labels, _, _ in series]
    assert names.count("stoker_gpu_job_info") == 320 and names.count("stoker_starved") == 200
    assert names.count("stoker_job_data_wait_seconds_total") == 20  # jobs 0 and 2 hint their steps
    peers = [json.loads(labels)["node"] for labels, value, _ in series if '"cause": "peer"' in labels and value]
    assert len(peers) == 9 + 9  # job 0: held back by its node 0's NAS; job 1: by its node 0's compute


def test_mutmut_harness_prepares_a_tree_mutmut_can_copy_and_reads_its_results(tmp_path):
    """bench/mutmut_detect.py: mutmut copies tests/ following links, and the sysfs fixtures' links loop;
    the prepared tree has no tests/, links the fixtures into mutants/, configures mutmut for the chosen
    files and tests; the results' lines count by file and status (the format of mutmut 3.8's
    `mutmut results --all true`)."""
    import tomllib

    from bench import mutmut_detect

    tree = tmp_path / "tree"
    mutmut_detect.prepare(tree, ["stoker/detect/arbiter.py"], ["tests/test_checkpoint_events.py"])
    assert not (tree / "tests").exists() and (tree / "t" / "test_checkpoint_events.py").is_file()
    assert "from tests." not in (tree / "t" / "test_checkpoint_events.py").read_text()
    assert "from tests." not in (tree / "t" / "test_detect.py").read_text(), "its helpers' module, not selected"
    assert (tree / "mutants" / "t" / "fixtures").resolve() == (tree / "t" / "fixtures").resolve()
    cfg = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert cfg["only_mutate"] == ["stoker/detect/arbiter.py"]
    assert cfg["pytest_add_cli_args_test_selection"] == ["t/test_checkpoint_events.py"]
    assert {"t/conftest.py", "t/test_detect.py"} <= set(cfg["also_copy"])
    assert not any(p.startswith("tests") for p in cfg["also_copy"])
    results = ("    stoker.detect.arbiter.xǁArbiterǁchallenge__mutmut_5: survived\n"
               "    stoker.detect.arbiter.xǁArbiterǁend__mutmut_1: killed\n"
               "    stoker.detect.state.x_load__mutmut_3: no tests\n")
    counts = mutmut_detect.tally(results)
    assert counts == {"arbiter.py": {"survived": 1, "killed": 1}, "state.py": {"no tests": 1}}
