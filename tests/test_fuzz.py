"""Fuzzing every parser of outside input: no input makes an exception escape.

Inputs are real files mutated (mountstats texts, a sysfs tree, the TOML and
web configurations, the state file, scenario files, pressure files), plus raw
counter sequences. Each test checks more than "no exception": the properties
that make a damaged input harmless (one bad file drops its own series,
counters never go back, no duplicate series, no NaN restored, one line naming
the key).

Seeds: every run draws new examples from a new seed (tests/conftest.py), shown
in the header and with any failure; `--hypothesis-seed=N` replays that run.
Budget: in CI each test runs a fixed number of examples (the whole file takes
35-50 s on a shared 2-core machine). A developer run explores further (3,000
per test: about 6 minutes):

    STOKER_FUZZ_EXAMPLES=3000 .venv/bin/python -m pytest tests/test_fuzz.py -s

`-s` prints, per target, the inputs tried and the worst time per input;
`STOKER_FUZZ_REPORT=path.json` writes the same figures to a file
(docs/RELIABILITY.md quotes them).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from stoker import config as stoker_config
from stoker.config import DEFAULT_NFS_OPERATIONS, ConfigError
from stoker.counters import Monotonic, MIN_SECONDS
from stoker.exporters import nfs as nfs_families
from stoker.exporters import rdma as rdma_families
from stoker.exporters import webconfig
from stoker.exporters.exposition import render
from stoker.sources.mountstats import parse
from stoker.sources.nfs import NfsSource
from stoker.sources.rdma import RdmaSource
from tests.conftest import ManualClock

FIXTURES = Path(__file__).parent / "fixtures"
LONG = int(os.environ.get("STOKER_FUZZ_EXAMPLES", "0"))
HANG_SECONDS = 10.0  # "did not hang": generous; parsers take milliseconds, YAML nested 2,000 deep 1-3 s

pytestmark = pytest.mark.timeout(0 if LONG else 120)


def budget(ci_examples: int):
    """The CI budget, or the developer's longer run; random either way, the seed printed (module doc)."""
    if LONG:
        return settings(max_examples=LONG, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))
    return settings(max_examples=ci_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


STATS: dict[str, dict] = defaultdict(lambda: {"inputs": 0, "worst_seconds": 0.0, "worst_input": ""})


def timed(target: str, size: str, fn):
    """Run one input through `fn`, keep the figures, and fail an input that looks like a hang."""
    start = time.perf_counter()
    try:
        return fn()
    finally:
        elapsed = time.perf_counter() - start
        stats = STATS[target]
        stats["inputs"] += 1
        if elapsed > stats["worst_seconds"]:
            stats["worst_seconds"], stats["worst_input"] = elapsed, size
        assert elapsed < HANG_SECONDS, f"{target}: {elapsed:.2f} s for one input ({size})"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    lines = [f"{name}: {s['inputs']} inputs, worst {1000 * s['worst_seconds']:.1f} ms ({s['worst_input']})"
             for name, s in sorted(STATS.items())]
    print("\nfuzz figures\n" + "\n".join(lines))
    if path := os.environ.get("STOKER_FUZZ_REPORT"):
        Path(path).write_text(json.dumps({"examples_per_test": LONG or "ci", **STATS}, indent=1) + "\n")


def unique_series(body: bytes) -> None:
    samples = [(s.name, tuple(sorted(s.labels.items())))
               for f in text_string_to_metric_families(body.decode()) for s in f.samples]
    assert len(samples) == len(set(samples)), "duplicate series: Prometheus would reject the scrape"


@st.composite
def mutated(draw, seeds: list[str], tokens: list[str], max_steps: int = 12) -> str:
    """A seed text after a few edits: insertions of tokens that mean something to the parser,
    deletions, copies of stretches (repeated lines and blocks), runs of one token, a cut."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, max_steps))):
        how = draw(st.sampled_from(("insert", "replace", "delete", "copy", "run", "cut")))
        pos = draw(st.integers(0, len(text)))
        if how == "cut":
            text = text[:pos]
        elif how == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 200)):]
        elif how == "copy":
            end = pos + draw(st.integers(1, 600))
            at = draw(st.integers(0, len(text)))
            text = text[:at] + text[pos:end] + text[at:]
        else:
            piece = draw(st.one_of(st.sampled_from(tokens), st.text(max_size=16)))
            if how == "run":
                piece *= draw(st.integers(2, max(2, 50_000 // max(1, len(piece)))))
            text = text[:pos] + piece + (text[pos + len(piece):] if how == "replace" else text[pos:])
    return text


# -- mountstats --------------------------------------------------------------------------------

MOUNTSTATS = [p.read_text() for p in sorted((FIXTURES / "procfs" / "mountstats").glob("*.txt"))]
MOUNTSTATS.append((FIXTURES / "procfs" / "node" / "4242" / "mountstats").read_text())
MS_FIELDS = st.one_of(
    st.sampled_from(["", ":", "device", "mounted", "on", "with", "fstype", "nfs", "nfs4", "statvers=1.1",
                     "statvers=", "per-op", "statistics", "READ:", "WRITE:", "xprt:", "bytes:", "opts:", "rdma",
                     "rw,vers=4.1,nconnect=\u00b2", "nconnect=99999999999", "18446744073709551615",
                     "18446743919241604546", "-1", "N/A", "\u0663", "\x00", "\ufffd", "/mnt/data"]),
    st.from_regex(r"[0-9]{1,25}", fullmatch=True),
    st.from_regex(r"[0-9]{300,5000}", fullmatch=True),
    st.from_regex(r"/mnt/[a-z]{0,3}(\\[0-9]{3}|\\[0-9]{0,2}[a-z]?){1,2}", fullmatch=True),  # escapes, good and bad
    st.text(max_size=12),
)
MS_LINES = st.one_of(
    st.sampled_from(["", "\tper-op statistics", "\tbytes:\t1 2 3 4 5 6 7 8", "\txprt:\trdma 0 0 0",
                     "\topts:\trw,vers=4.1,proto=tcp", "\t        READ: 1 2 3",
                     "\t       WRITE: 1 1 0 1 1 0 1 1 0 1 1 1", "device nas:/x mounted on /mnt/data with fstype nfs4",
                     "device nas:/y mounted on /mnt/data with fstype nfs statvers=1.0", " mounted on ", "\x0b\x1c"]),
    st.text(max_size=30),
)


@st.composite
def mountstats_texts(draw, max_steps: int = 10) -> str:
    """A real mountstats after edits at the grain the parser reads: a field of a line replaced
    (numbers of any length, escapes good and bad, keywords), lines inserted, dropped or run
    thousands of times (blank lines within a block), whole mount blocks copied (stacked mounts
    on one mountpoint), and a cut anywhere (a read torn mid-line)."""
    lines = draw(st.sampled_from(MOUNTSTATS)).split("\n")
    for _ in range(draw(st.integers(1, max_steps))):
        how = draw(st.sampled_from(("field", "field", "header", "line", "drop", "run", "block", "cut")))
        i = draw(st.integers(0, len(lines) - 1))
        if how in ("field", "header"):
            if how == "header":  # the mount's identity: device, mountpoint (escapes), fstype, statvers
                i = draw(st.sampled_from([k for k, line in enumerate(lines) if line.startswith("device ")] or [i]))
            fields = lines[i].split(" ")
            j = draw(st.sampled_from((1, 4, 4, 4, 7, 8)) if how == "header" else st.integers(0, len(fields) - 1))
            fields[min(j, len(fields) - 1)] = draw(MS_FIELDS)
            lines[i] = " ".join(fields)
        elif how == "line":
            lines.insert(i, draw(MS_LINES))
        elif how == "drop" and len(lines) > 1:
            del lines[i]
        elif how == "run":
            line = draw(st.one_of(st.just(""), st.just(lines[i]), MS_LINES))
            lines[i:i] = [line] * draw(st.integers(2, 5000 // (1 + len(line) // 40)))
        elif how == "block":
            starts = [k for k, line in enumerate(lines) if line.startswith("device ")] or [0]
            start = draw(st.sampled_from(starts))
            end = next((k for k in range(start + 1, len(lines)) if lines[k].startswith("device ")), len(lines))
            at = draw(st.sampled_from([*starts, len(lines)]))
            lines[at:at] = lines[start:end]
        elif how == "cut":
            text = "\n".join(lines)
            lines = text[:draw(st.integers(0, len(text)))].split("\n")
    return "\n".join(lines)


@budget(600)
@given(mountstats_texts())
def test_mountstats_parse_never_raises(text):
    mounts, problems = timed("mountstats.parse", f"{len(text)} bytes", lambda: parse(text))
    assert all(isinstance(p, str) for p in problems)
    for m in mounts:
        assert m.mountpoint and m.fstype in ("nfs", "nfs4")
        for value in (m.server_read_bytes, m.server_write_bytes, m.client_write_bytes):
            assert value is None or 0 <= value < 1 << 64
        assert all(0 <= v < 1 << 63 for op in m.ops.values() for v in op.values())


@budget(300)
@given(st.lists(mountstats_texts(max_steps=4), min_size=2, max_size=4))
def test_nfs_collector_over_damaged_cycles_keeps_counters_and_series_sound(texts):
    """Cycle after cycle of damaged files: one sample per mountpoint, no duplicate series,
    and no exported counter of a mountpoint ever goes back."""
    with tempfile.TemporaryDirectory() as root:
        os.mkdir(os.path.join(root, "self"))
        clock = ManualClock()
        source = NfsSource(root, DEFAULT_NFS_OPERATIONS, {"data": ("/mnt/data",)}, clock=clock)
        last: dict[tuple, float] = {}
        for text in texts:
            with open(os.path.join(root, "self", "mountstats"), "w") as fh:
                fh.write(text)
            snap = timed("nfs collector cycle", f"{len(text)} bytes", source.sample)
            mountpoints = [m.mountpoint for m in snap.mounts]
            assert len(mountpoints) == len(set(mountpoints))
            unique_series(render(nfs_families.families(snap)))
            for m in snap.mounts:
                values = {"read": m.read_bytes, "write": m.write_bytes, "client_write": m.client_write_bytes}
                values.update({(op, f): v for op, fields in m.ops.items() for f, v in fields.items()})
                for name, value in values.items():
                    if value is None:
                        continue
                    key = (m.mountpoint, name)
                    assert value >= last.get(key, 0.0), f"{key} went back"
                    last[key] = value
            clock.advance(1.0)


# -- RDMA sysfs --------------------------------------------------------------------------------

SMALL = FIXTURES / "sysfs" / "small"
DEVICE = "devices/pci0000:16/0000:16:02.0/0000:18:00.0/infiniband/rocep24s0f0"
FILES = sorted(str(p.relative_to(SMALL)) for p in SMALL.rglob("*") if p.is_file() and not p.is_symlink()
               and p.relative_to(SMALL).parts[-2] != "ens24f0np0")
CLEAN = RdmaSource(str(SMALL)).sample()
ANY_TEXT = st.one_of(st.sampled_from(["", "\n", "N/A (no PMA)", "\x00\xff", "\u0663", "Ethernet"]),
                    st.text(max_size=40))
COUNTER_TEXT = st.one_of(  # what a counter file might hold: any u64 and beyond, and near misses
    st.sampled_from(["0", "18446744073709551615", str(1 << 63), "-1", "+5", "1_000", " 12 ", "1e9", "0x10",
                     "4294967295", "4294967296"]),
    st.from_regex(r"[0-9]{1,25}", fullmatch=True),
    st.from_regex(r"[0-9]{300,5000}", fullmatch=True),
    ANY_TEXT,
)
VALUES_BY_FILE = {
    "rate": st.one_of(st.from_regex(r"[0-9.]{1,12} ?Gb/sec( \([0-9]X [A-Z]{3}\))?", fullmatch=True),
                      st.sampled_from(["0 Gb/sec (0X SDR)", "400 Gb/sec (4X NDR)", "1e999 Gb/sec"]), ANY_TEXT),
    "state": st.one_of(st.from_regex(r"[0-9]{1,2}: [A-Z_]{0,8}", fullmatch=True), ANY_TEXT),
}


@st.composite
def faults(draw, files: list[str], kinds=("text", "text", "text", "fifo", "dir", "missing", "loop")):
    """Damage to a few files of the tree: for each, a kind of fault and, for text, a value in
    the shape the file expects (a counter, a rate, a state) or not."""
    chosen = draw(st.lists(st.sampled_from(files), min_size=1, max_size=8, unique=True))
    out = {}
    for rel in chosen:
        kind = draw(st.sampled_from(kinds))
        name = os.path.basename(rel)
        value = draw(VALUES_BY_FILE.get(name, COUNTER_TEXT if "counters/" in rel else ANY_TEXT)) if kind == "text" else ""
        out[rel] = (kind, value)
    return out


def damage(root: Path, rel: str, kind: str, value: str) -> None:
    path = root / rel
    path.unlink()
    if kind == "text":
        path.write_text(value)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path.name)


def port_values(snapshot) -> dict[tuple, float]:
    out = {}
    for p in snapshot.ports:
        for group, values in (("traffic", p.traffic), ("errors", p.errors), ("hw", p.hw_counters)):
            out.update({(p.device, p.port, group, k): v for k, v in values.items()})
    return out


@budget(300)
@given(faults(FILES), faults([f for f in FILES if "counters/" in f or f.endswith(("/rate", "/state"))],
                             kinds=("text",)))
def test_rdma_damaged_files_drop_only_their_own_series(damage_first, damage_second):
    """Any damage to any files: both ports are still reported, every series whose file is intact
    has its clean value, and in the next cycle no counter goes back."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sys"
        shutil.copytree(SMALL, root, symlinks=True)
        for rel, (kind, value) in damage_first.items():
            damage(root, rel, kind, value)
        clock = ManualClock()
        source = RdmaSource(str(root), clock=clock)
        first = timed("rdma sample", f"{len(damage_first)} files damaged", source.sample)
        assert sorted((p.device, p.port) for p in first.ports) == [("rocep24s0f0", "1"), ("rocep24s0f0", "2")]
        damaged = {(rel.split("/")[-3] if "counters" in rel else "", os.path.basename(rel)) for rel in damage_first}
        clean, got = port_values(CLEAN), port_values(first)
        for key, value in clean.items():
            device, port, group, name = key
            file = {"transmit_bytes": "port_xmit_data", "receive_bytes": "port_rcv_data",
                    "transmit_packets": "port_xmit_packets", "receive_packets": "port_rcv_packets"}.get(name, name)
            if not any(d == (port, file) for d in damaged):
                assert got.get(key) == value, f"{key}: an intact file lost its series"
        unique_series(render(rdma_families.families(first)))
        for rel, (_, value) in damage_second.items():
            if (root / rel).is_file() and not (root / rel).is_symlink():
                (root / rel).write_text(value)
        clock.advance(1.0)
        after = port_values(timed("rdma sample", f"{len(damage_second)} files damaged", source.sample))
        for key, value in after.items():
            assert value >= got.get(key, 0.0), f"{key} went back"


@budget(400)
@given(st.lists(st.tuples(st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 33)),
                          st.floats(0.0, 30.0)), min_size=1, max_size=40),
       st.sampled_from([None, 32]), st.sampled_from([None, 1e3, 2e9, 1e11]))
def test_monotonic_never_goes_back_and_respects_its_bound(readings, width, per_second):
    counter = Monotonic(width)
    now, total = 0.0, None
    for raw, dt in readings:
        at, now = now, now + dt
        before = total
        total = counter.update(raw, now, per_second)
        assert math.isfinite(total)
        if before is not None:
            assert total >= before
            if per_second is not None:
                assert total - before <= per_second * max(now - at, MIN_SECONDS)


# -- configuration -----------------------------------------------------------------------------

README = (Path(__file__).parent.parent / "README.md").read_text()
TOML_SEED = README.split("```toml\n", 1)[1].split("```", 1)[0]
TOML_SEEDS = [TOML_SEED, "[agent]\ninterval = 0.5\n", '[[probes.targets]]\nmountpoint = "/mnt/data"\n']
TOML_TOKENS = [
    "\n", "=", " = ", "[", "]", "[[", "]]", '"', "'", "#", ",", "{", "}", ".", "1e999", "inf", "nan", "-inf",
    "-1", "0", "0.0", "-0.0", "9" * 400, "9" * 5000, "true", "false", "[agent]", "[[probes.targets]]",
    "listen = ", '"0.0.0.0:99999"', '":"', '"[::1]:9477"', "interval = ", "operations = []",
    "data_mounts = [1]", 'mountpoint = "relative"', "unknown = 1", "[sim]\n", "rdma_ports = 3",
    "1979-05-27T07:32:00Z", '"\\u0000"', '"\\ud800"', "\x00", "\ufffd", "[" * 200, "a.b.c.d = 1",
]


@budget(300)
@given(mutated(TOML_SEEDS, TOML_TOKENS, max_steps=6))
def test_config_load_gives_a_config_or_a_config_error(text):
    loaded_or_refused("config.load", text, ".toml", stoker_config.load, stoker_config.Config)


def loaded_or_refused(name: str, text: str, suffix: str, load, kind) -> None:
    """`load` on a file holding `text` gives a `kind`, or a ConfigError with a message (one line
    naming the key is what the operator sees); anything else escaping is a defect."""
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False) as fh:
        fh.write(text)

    def attempt() -> None:
        try:
            loaded = load(fh.name)
        except ConfigError as exc:
            assert str(exc)
            return
        assert isinstance(loaded, kind)
    try:
        timed(name, f"{len(text)} bytes", attempt)
    finally:
        os.unlink(fh.name)


YAML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**30), st.floats(allow_nan=True),
              st.sampled_from(["", "TLS12", "TLS13", "TLS99", "$2b$04$" + "a" * 53, "$2x", "NoClientCert",
                               "RequireAndVerifyClientCert", "/nonexistent", "/dev/null", "cert.pem"]),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)),
    max_leaves=8,
)
WEB_KEYS = {
    "tls_server_config": ["cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
                          "max_version", "cipher_suites"],
    "basic_auth_users": ["prometheus", "alice"],
    "http_server_config": ["headers", "http2"],
}


@st.composite
def web_documents(draw) -> str:
    """Web configuration files: the real keys with values of any shape, or mangled YAML text."""
    doc = {}
    for top in draw(st.lists(st.sampled_from([*WEB_KEYS, "unknown"]), max_size=3, unique=True)):
        if top == "unknown" or draw(st.booleans()):
            doc[top] = draw(YAML_VALUES)
        else:
            doc[top] = {k: draw(YAML_VALUES) for k in draw(st.lists(st.sampled_from(WEB_KEYS[top]),
                                                                     max_size=4, unique=True))}
    text = yaml.safe_dump(doc, allow_unicode=True)
    if draw(st.booleans()):
        text = draw(mutated([text], ["\n", ":", " ", "- ", "{", "}", "[", "]", "&a", "*a", "!!python/object",
                                     "? ", "'", '"', "\t", "%YAML 1.1\n", "---\n", "..."], max_steps=3))
    return text


@budget(300)
@given(web_documents())
def test_web_config_load_gives_a_web_config_or_a_config_error(text):
    loaded_or_refused("webconfig.load", text, ".yml", webconfig.load, webconfig.WebConfig)


# -- the state file ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True),
              st.sampled_from(["storage", "hint", "detected", "/mnt/ckpt", "/mnt/\ud800", "", "\x00"]),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)
STATE_SEED = {"pids": [4242, 4243], "level": 0.9, "saved": 999.0, "verdict": {"cause": "storage", "cold": False,
              "came_back": True}, "checkpoints": [{"mountpoint": "/mnt/ckpt", "started": 900.0, "source": "hint",
              "start_server": 0.0, "start_client": 0.0, "last_server": 5e9, "progress": 990.0,
              "expected_bytes": None, "stalled": False}]}
STATE_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1", "0", "null", "true", "[", "]", "{", "}", ",", ":", '"',
                '"\\ud800"', '"\\u0000"', "9" * 5000, "[" * 3000, '"mountpoint"', '"level"', '"saved"', '"verdict"',
                "\xff", "\ufffd"]


@st.composite
def state_texts(draw) -> str:
    """A state file: the agent's own with a field given any JSON value, or its text mutated."""
    record = json.loads(json.dumps(STATE_SEED))
    for _ in range(draw(st.integers(0, 3))):
        checkpoints = record.get("checkpoints")
        nested = [record, record.get("verdict"), checkpoints[0] if isinstance(checkpoints, list) and checkpoints else 0]
        target = draw(st.sampled_from([d for d in nested if isinstance(d, dict)]))
        key = draw(st.sampled_from(sorted(target) + ["unknown"]))
        target[key] = draw(JSON_VALUES)
    text = json.dumps(record)
    if draw(st.booleans()):
        text = draw(mutated([text], STATE_TOKENS, max_steps=4))
    return text


def finite_record(record: dict) -> bool:
    return all(not isinstance(v, float) or math.isfinite(v) for v in record.values())


@budget(400)
@given(state_texts())
def test_state_file_load_gives_sound_state_or_nothing(text):
    """Whatever the file holds: no exception, nothing but finite numbers restored, a level in (0, 1], a
    known cause, and what was loaded saves again (no NaN or lone surrogate can be written back)."""
    from stoker.detect.attribution import CAUSES
    from stoker.detect.state import StateStore
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "state.json")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        store = StateStore(path, max_age=300.0, wall=lambda: 1000.0)
        with capture_logs() as lines:
            saved = timed("state file load", f"{len(text)} bytes", store.load)
        if saved is None:
            assert len(lines) <= 1, lines  # a file as a whole: one line
            return
        assert saved.level is None or (math.isfinite(saved.level) and 0 < saved.level <= 1)
        assert saved.cause is None or saved.cause in CAUSES
        assert all(type(p) is int and p > 0 for p in saved.pids)
        assert all(finite_record(r) for r in saved.checkpoints)
        store.save(saved.pids, saved.level, saved.checkpoints, (saved.cause, saved.cold, saved.came_back)
                   if saved.cause else None)
        assert store.load() is not None


# -- scenario files ----------------------------------------------------------------------------

SCENARIO_SEEDS = [(Path(__file__).parent.parent / "stoker" / "sim" / "data" / "scenarios" / f"{name}.toml").read_text()
                  for name in ("cycle", "storage-starved", "checkpoint")]
SCENARIO_TOKENS = ["\n", "=", " = ", "[[steps]]\n", "[[expect]]\n", "[outcomes]\n", "seconds = ", "from = ", "to = ",
                   "within = ", "fault_at = ", "restarts = [", "inf", "nan", "-inf", "1e308", "-1", "0", "0.0", "1e-300",
                   "9" * 400, "9" * 5000, "[" * 3000, "[" * 100, "]", '"', "'", "job = ", '"../x"', "launch = ",
                   "lost_gpus = [9]", 'gpu = "saturated"', 'storage = "hung"', "level = 2", "true", "\x00", "\ufffd"]


@budget(300)
@given(mutated(SCENARIO_SEEDS, SCENARIO_TOKENS, max_steps=6))
def test_scenario_parse_gives_a_bounded_scenario_or_one_line(text):
    """A scenario, every time in it finite and within a day, its lists within their caps; or a
    ScenarioError of one line. Nothing else escapes (a RecursionError or OverflowError did)."""
    from stoker.sim import scenarios

    def attempt():
        try:
            return scenarios.parse(text, "fuzz")
        except scenarios.ScenarioError as exc:
            assert str(exc) and "\n" not in str(exc).strip("\n").split(": not valid TOML")[0]
            return None
    scenario = timed("scenario parse", f"{len(text)} bytes", attempt)
    if scenario is None:
        return
    assert 1 <= len(scenario.steps) <= scenarios.MAX_STEPS and len(scenario.expect) <= scenarios.MAX_EXPECTATIONS
    times = [s.duration for s in scenario.steps] + [t for e in scenario.expect for t in (e.start, e.end, e.within)]
    times += [scenario.fault_at, *scenario.restarts]
    assert all(math.isfinite(t) and 0 <= t <= scenarios.MAX_SECONDS for t in times)
    assert len({(s.job, s.launch, s.scheduler) for s in scenario.steps if s.has_job}) <= scenarios.MAX_LAUNCHES


# -- pressure files ----------------------------------------------------------------------------

PRESSURE_SEED = ("some avg10=1.50 avg60=0.90 avg300=0.40 total=123456789\n"
                 "full avg10=0.00 avg60=0.00 avg300=0.00 total=4242\n")


@budget(200)
@given(mutated([PRESSURE_SEED], ["total=", "some ", "full ", "=", " ", "\n", "18446744073709551616", "9" * 3000,
                                 "-1", "\u00b2", "\u0663", "\x00"], max_steps=6))
def test_pressure_parse_gives_u64_totals_and_the_source_never_fails(text):
    from stoker.sources.pressure import PressureSource, parse
    totals = timed("pressure parse", f"{len(text)} bytes", lambda: parse(text))
    assert set(totals) <= {"some", "full"} and all(0 <= v < 1 << 64 for v in totals.values())
    with tempfile.TemporaryDirectory() as root:
        os.mkdir(os.path.join(root, "pressure"))
        with open(os.path.join(root, "pressure", "cpu"), "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        snap = PressureSource(root).sample()
        assert all(math.isfinite(v) for v in (*snap.some_seconds.values(), *snap.full_seconds.values()))
