"""Configuration: a TOML file turned into frozen dataclasses.

Every key is declared once, as a dataclass field with its default; the loader
walks those declarations, so an unknown key, a wrong type or a bad value is
reported as one line that names the key (``agent.interval: must be between
0.05 and 3600 seconds, got inf``) and the agent exits with status 2 instead of
starting half-configured. Every duration and threshold has a finite range: an
infinite interval would freeze a collector while /healthz still said ok, one of
5e-324 s would overflow the scheduler's arithmetic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from stoker.sources.files import Refused, Unanswered, read_operator_file, shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_PORT = 9477
"""Not used by node_exporter (9100), dcgm-exporter (9400) or nvidia_gpu_exporter (9835)."""

DEFAULT_FILE = "/etc/stoker/stoker.toml"
"""The service's configuration, which every command reads when it exists and no --config is given."""

# The ranges a number must fall in. Wide enough for any real node, narrow enough that no value
# breaks the agent: an interval under 50 ms takes a whole core, one over an hour is not monitoring.
INTERVAL = (0.05, 3600.0)
CALL_TIMEOUT = (0.01, 600.0)
WINDOW = (0.001, 86400.0)         # detection windows and delays: a millisecond to a day
LATENCY = (1e-6, 3600.0)          # NFS over RDMA answers in tens of microseconds
EVENT_RATE = (0.001, 1e9)
BYTE_RATE = (1.0, 1e13)
CHECKPOINT_TIME = (0.001, 7 * 86400.0)

MAX_FILE_BYTES = 1 << 20
"""Configuration, web configuration and token files are small; anything larger is the wrong file."""
READ_DEADLINE = 5.0
"""Seconds one of those files may take to read: milliseconds on a local disk or a healthy NFS mount;
past it the mount is taken as hung (files.read_regular_within)."""


class ConfigError(ValueError):
    """A configuration problem, worded for the operator: ``key: what is wrong``."""


class FileUnanswered(ConfigError):
    """A file that did not answer within READ_DEADLINE: nothing wrong with what it holds, and a later
    try may read it (the agent exits for a restart rather than with the status of a bad file)."""


@dataclass(frozen=True)
class AgentConfig:
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    interval: float = 1.0
    log_format: str = "auto"
    sysfs_root: str = "/sys"
    procfs_root: str = "/proc"
    web_config_file: str = ""
    """TLS and basic auth for /metrics, in Prometheus' exporter-toolkit format; empty: plain HTTP."""
    state_file: str = ""
    """Where the level learned for the running job is kept across restarts; empty: not kept."""
    process_metrics: bool = True
    """process_* (CPU, memory, descriptors, start time of the agent itself), as every Prometheus client serves them."""

    def validate(self) -> None:
        parse_listen(self.listen, "agent.listen")
        _seconds(self.interval, "agent.interval", *INTERVAL)
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError("agent.log_format: must be one of auto, json, console")


@dataclass(frozen=True)
class GpuConfig:
    enabled: bool = True
    slow_interval: float = 10.0
    """Energy, ECC, row remaps and PCIe replays: slow to read (energy costs 3.4 ms a GPU), slow to move."""
    call_timeout: float = 2.0
    """Deadline for one NVML cycle; a driver call hung longer marks the cycle failed."""

    def validate(self) -> None:
        _seconds(self.slow_interval, "gpu.slow_interval", *INTERVAL)
        _seconds(self.call_timeout, "gpu.call_timeout", *CALL_TIMEOUT)


@dataclass(frozen=True)
class RdmaConfig:
    enabled: bool = True
    call_timeout: float = 2.0
    """Deadline for one pass over class/infiniband; a hung firmware query fails the cycle, not the agent."""
    hw_counters: str | tuple[str, ...] = "default"
    """Which `hw_counters/` files become `stoker_rdma_hw_events_total` series: "default" (those the verdicts,
    alerts and dashboards read, and the error counters checked first: stoker/exporters/rdma.py), "all", or a
    list of kernel file names. Only the export: the verdicts read every counter whatever this says."""

    def validate(self) -> None:
        _seconds(self.call_timeout, "rdma.call_timeout", *CALL_TIMEOUT)
        if isinstance(self.hw_counters, str):
            if self.hw_counters not in ("default", "all"):
                raise ConfigError(f"rdma.hw_counters: must be \"default\", \"all\" or a list of counter names, "
                                  f"got {self.hw_counters!r}")
        else:
            for name in self.hw_counters:
                if not name or len(name) > 64 or not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
                    raise ConfigError(f"rdma.hw_counters: {name!r} is not an hw_counters file name")


@dataclass(frozen=True)
class NetdevConfig:
    enabled: bool = True
    include: tuple[str, ...] = ()
    """Interfaces watched in addition to the netdevs behind the RDMA ports."""
    exclude: tuple[str, ...] = ()
    """Interfaces never watched, even when an RDMA port maps to them."""
    call_timeout: float = 2.0

    def validate(self) -> None:
        _seconds(self.call_timeout, "netdev.call_timeout", *CALL_TIMEOUT)
        for key, names in (("netdev.include", self.include), ("netdev.exclude", self.exclude)):
            for name in names:
                if not name or len(name) > 15 or "/" in name or " " in name:
                    raise ConfigError(f"{key}: {name!r} is not an interface name")


DEFAULT_NFS_OPERATIONS = ("READ", "WRITE", "COMMIT", "GETATTR", "LOOKUP", "ACCESS", "OPEN", "CLOSE", "READDIR")


@dataclass(frozen=True)
class NfsConfig:
    enabled: bool = True
    operations: tuple[str, ...] = DEFAULT_NFS_OPERATIONS
    """Per-op series are kept for these operations only: NFSv4 has ~60, most idle."""
    data_mounts: tuple[str, ...] = ()
    """Mountpoint prefixes of training-data mounts (role `data`)."""
    checkpoint_mounts: tuple[str, ...] = ()
    """Mountpoint prefixes of checkpoint targets (role `checkpoint`)."""
    call_timeout: float = 2.0

    def validate(self) -> None:
        _seconds(self.call_timeout, "nfs.call_timeout", *CALL_TIMEOUT)
        for key, prefixes in (("nfs.data_mounts", self.data_mounts), ("nfs.checkpoint_mounts", self.checkpoint_mounts)):
            for prefix in prefixes:
                if not prefix.startswith("/"):
                    raise ConfigError(f"{key}: {prefix!r} is not an absolute path")
        if not self.operations:
            raise ConfigError("nfs.operations: must name at least one operation")

    def roles(self) -> dict[str, tuple[str, ...]]:
        return {"data": self.data_mounts, "checkpoint": self.checkpoint_mounts}


@dataclass(frozen=True)
class HostConfig:
    enabled: bool = True
    """Pressure stall information (`<procfs_root>/pressure/*`): evidence for the `host` cause."""
    call_timeout: float = 2.0

    def validate(self) -> None:
        _seconds(self.call_timeout, "host.call_timeout", *CALL_TIMEOUT)


@dataclass(frozen=True)
class ProbeTarget:
    mountpoint: str
    """The NFS mountpoint this probe measures (its `mountpoint` label)."""
    path: str = ""
    """Directory the probe files go in; default: the mountpoint itself."""

    @property
    def directory(self) -> str:
        return self.path or self.mountpoint


@dataclass(frozen=True)
class ProbesConfig:
    targets: tuple[ProbeTarget, ...] = ()
    interval: float = 15.0
    """One write+fsync, uncached read and create/stat/unlink per mount every 15 s: a few MB a minute."""
    timeout: float = 10.0
    """A probe unfinished after this long is a timeout; NFS hard mounts retry for minutes, so this is not an error of the NAS alone."""
    size: int = 1048576
    """Bytes written and read back: one rsize/wsize-sized RPC on PowerScale defaults."""

    def validate(self) -> None:
        _seconds(self.interval, "probes.interval", 1.0, 3600.0)  # each probe is a child process and 1 MiB of I/O
        _seconds(self.timeout, "probes.timeout", 0.1, 600.0)
        if self.size < 4096 or self.size > 64 << 20:
            raise ConfigError(f"probes.size: must be between 4096 and {64 << 20}, got {self.size}")
        for i, t in enumerate(self.targets):
            for key, value in (("mountpoint", t.mountpoint), ("path", t.path)):
                if value and not value.startswith("/"):
                    raise ConfigError(f"probes.targets[{i}].{key}: {value!r} is not an absolute path")


@dataclass(frozen=True)
class DetectConfig:
    """Starvation thresholds; docs/VERDICTS.md gives the reason for each default."""

    enabled: bool = True
    job_memory_floor_bytes: int = 4 << 30
    drop_ratio: float = 0.5
    recover_ratio: float = 0.8
    idle_floor: float = 0.05
    cold_floor: float = 0.5
    recover_after: float = 3.0
    flap_window: float = 30.0
    flap_factor: float = 3.0
    baseline_window: float = 300.0
    evidence_memory: float = 15.0
    tolerate_after: float = 10.0
    prefetch_hides: float = 120.0
    reads_stalled_after: float = 1.0
    cnp_per_second: float = 500.0
    pause_ratio: float = 0.02
    retransmits_per_second: float = 20.0
    read_latency_seconds: float = 0.020
    read_queue_seconds: float = 0.010
    write_latency_seconds: float = 0.100
    probe_latency_seconds: float = 1.0
    probe_hung_seconds: float = 5.0
    cpu_pressure_ratio: float = 0.4
    memory_pressure_ratio: float = 0.2

    def validate(self) -> None:
        for name in ("drop_ratio", "recover_ratio", "idle_floor", "cold_floor", "cpu_pressure_ratio",
                     "memory_pressure_ratio", "pause_ratio"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"detect.{name}: must be between 0 and 1 (exclusive), got {value!r}")
        if self.recover_ratio <= self.drop_ratio:
            raise ConfigError("detect.recover_ratio: must be above detect.drop_ratio (hysteresis)")
        _within(self.flap_factor, "detect.flap_factor", 1.0, 100.0)
        _within(self.job_memory_floor_bytes, "detect.job_memory_floor_bytes", 0, 1 << 50, " bytes")
        for name in ("recover_after", "flap_window", "baseline_window", "evidence_memory", "tolerate_after",
                     "prefetch_hides", "reads_stalled_after"):
            _seconds(getattr(self, name), f"detect.{name}", *WINDOW)
        for name in ("read_latency_seconds", "read_queue_seconds", "write_latency_seconds",
                     "probe_latency_seconds", "probe_hung_seconds"):
            _seconds(getattr(self, name), f"detect.{name}", *LATENCY)
        for name in ("cnp_per_second", "retransmits_per_second"):
            _within(getattr(self, name), f"detect.{name}", *EVENT_RATE, " per second")


@dataclass(frozen=True)
class CheckpointConfig:
    stall_after: float = 120.0
    """In progress and no byte reached the server for this long: stalled."""
    budget: float = 600.0
    """A checkpoint running longer than this is over budget."""
    abandon_after: float = 3600.0
    """A checkpoint nobody ends (no hint, no resumption) is closed after this long."""
    listen: str = "127.0.0.1:9478"
    """The hint API: loopback only unless changed on purpose."""
    token_file: str = ""
    """File holding the bearer token of the hint API; without it the API is not served."""
    burst_bytes_per_second: float = 200e6
    """Write rate to a checkpoint mount that opens a detected checkpoint."""
    burst_factor: float = 10.0
    """...and at least this many times the mount's usual write rate."""
    write_floor_bytes_per_second: float = 1e6
    """Writes to a checkpoint mount above this (and the usual rate) while the GPUs wait are a checkpoint, however slow."""
    detect_after: float = 2.0
    """...once sustained this long."""
    quiet_after: float = 10.0
    """A detected checkpoint ends once no write has gone out for this long and nothing waits for the server."""

    def validate(self) -> None:
        for name in ("stall_after", "budget", "abandon_after", "detect_after", "quiet_after"):
            _seconds(getattr(self, name), f"checkpoint.{name}", *CHECKPOINT_TIME)
        for name in ("burst_bytes_per_second", "write_floor_bytes_per_second"):
            _within(getattr(self, name), f"checkpoint.{name}", *BYTE_RATE, " bytes per second")
        _within(self.burst_factor, "checkpoint.burst_factor", 1.0, 1e6)
        parse_listen(self.listen, "checkpoint.listen")


MAX_INVENTORY = 1024


@dataclass(frozen=True)
class InventoryConfig:
    """How many GPUs and RDMA ports this node should have: fewer present is StokerInventoryMissing.
    0 (the default): the most this node has shown since its first start, kept in agent.state_file."""

    gpus: int = 0
    rdma_ports: int = 0

    def validate(self) -> None:
        for name in ("gpus", "rdma_ports"):
            _within(getattr(self, name), f"inventory.{name}", 0, MAX_INVENTORY)


@dataclass(frozen=True)
class SimConfig:
    rdma_ports: int = 8
    """ConnectX-7 ports of the simulated node: 8 (one per GPU, rail design) or 4."""
    shorten: bool = True
    """Shorten the probe, stall and quiet times left at their defaults, so that every built-in scenario
    reaches its verdict within 30 s; false keeps the production values (to see the shipped alerts fire)."""

    def validate(self) -> None:
        if self.rdma_ports not in (4, 8):
            raise ConfigError(f"sim.rdma_ports: must be 4 or 8, got {self.rdma_ports!r}")


@dataclass(frozen=True)
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    rdma: RdmaConfig = field(default_factory=RdmaConfig)
    netdev: NetdevConfig = field(default_factory=NetdevConfig)
    nfs: NfsConfig = field(default_factory=NfsConfig)
    host: HostConfig = field(default_factory=HostConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    inventory: InventoryConfig = field(default_factory=InventoryConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()


LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME = re.compile(rf"(?=.{{1,253}}$){LABEL}(\.{LABEL})*\.?")
"""A host name as RFC 1123 allows it (and "_", which /etc/hosts may hold); anything else (a NUL, a label
over 63 characters, non-ASCII) failed in the resolver with a traceback and exit status 1."""


def parse_listen(value: str, key: str = "listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT with a port in 0-65535 (0: any free port), got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    if not HOSTNAME.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{key}: {host!r} is neither an IP address nor a host name") from None
    return host, int(port)


def _within(value: float, key: str, low: float, high: float, unit: str = "") -> None:
    """`low <= value <= high`, which also refuses nan; the message gives the range."""
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low:g} and {high:g}{unit}, got {value!r}")


def _seconds(value: float, key: str, low: float, high: float) -> None:
    _within(value, key, low, high, " seconds")


def _coerce(value, annotation, key: str):
    """Check one TOML value against its field's type; ints are accepted for floats."""
    if isinstance(value, str) and "\0" in value:  # TOML's \u0000: no path, address or name holds one
        raise ConfigError(f"{key}: holds a NUL character")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(annotation):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: unexpected type {type(value).__name__}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected nothing")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(annotation, value, key)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
        try:
            return float(value)
        except OverflowError:  # TOML integers have no bound; 10**400 is not a float
            raise ConfigError(f"{key}: out of range, got an integer of {len(str(value))} digits") from None
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got bool")
    if not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__}")
    return value


def _build(cls, table: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in table:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in table:
            raise ConfigError(f"{prefix}.{f.name}: required" if prefix else f"{f.name}: required")
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
        for name, value in table.items()
    }
    return cls(**kwargs)


def merge(base: dict, overrides: dict) -> dict:
    """Deep-merge ``overrides`` (from command-line flags) over the file's tables."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def path_for(given: str | None, simulated: bool = False) -> str | None:
    """The one rule for which file a command reads: the one given with --config; else the
    service's (DEFAULT_FILE) when it exists, so that `stoker run`, `check` and the service judge
    the node alike; none for a simulated node, which is not this node: the service's file names
    this node's mounts, probe targets and ports. Flags override whatever the file says."""
    if given is not None:
        return given
    return DEFAULT_FILE if not simulated and Path(DEFAULT_FILE).is_file() else None


def load(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Read ``path`` (or the defaults), apply flag ``overrides``, validate."""
    table: dict = {}
    if path is not None:
        text = read_text(path)
        try:
            table = parse_toml(text)
        except ValueError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = _build(Config, merge(table, overrides or {}))
    config.validate()
    return config


MAX_KEY_PARTS = 16
"""Parts of one dotted key (`a.b.c`) or table name. tomllib takes time quadratic in them: a key of 8,000
parts took 2 s, a 1 MiB file of one hours."""


def parse_toml(text: str) -> dict:
    """tomllib.loads within bounds of time and depth; ValueError (TOMLDecodeError, an integer of more
    than 4300 digits, or one of these bounds) says what is wrong."""
    line = _long_dotted_key(text)
    if line is not None:
        raise ValueError(f"line {line}: a key of more than {MAX_KEY_PARTS} dotted parts")
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _long_dotted_key(text: str) -> int | None:
    """The number of the first line that starts with a key or table name of more than `MAX_KEY_PARTS`
    parts (dots outside quotes, up to `=`); None when none does. A line with anything else before its
    `=` is no key (prose in a multi-line string), nor is one with two dots in a row (tomllib refuses
    an empty part at once)."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.count(".") >= MAX_KEY_PARTS and _key_parts(line) > MAX_KEY_PARTS:
            return number
    return None


def _key_parts(line: str) -> int:
    parts, quote, escaped, last = 1, "", False, ""
    for c in line:
        if quote:
            if escaped:
                escaped = False
            elif c == "\\" and quote == '"':
                escaped = True
            elif c == quote:
                quote = ""
            continue
        if c in "=#":
            break
        if c in "\"'":
            quote = c
        elif c == ".":
            if last == ".":
                return 0
            parts += 1
        elif not (c.isascii() and (c.isalnum() or c in "_-[] \t")):
            return 0
        if c not in " \t":
            last = c
    return parts


def read_text(path: str | Path, key: str = "") -> str:
    """The text of a file the operator points at (configuration, web configuration, token).

    Opened without blocking and refused unless it is a regular file: a FIFO blocks open() and
    read() until someone writes to it, on the event loop when a reload or the hint token reads
    it, and then not even SIGTERM gets through. Read in a thread of its own and given up after
    READ_DEADLINE (FileUnanswered): a regular file on a hung NFS mount blocks its read in the kernel.
    Capped at MAX_FILE_BYTES and decoded as UTF-8. Every error names `key` (when the file is a
    setting's value) and the file."""
    where = f"{key}: {shown(str(path))}" if key else shown(str(path))
    try:
        return read_operator_file(str(path), MAX_FILE_BYTES, READ_DEADLINE)
    except Unanswered as exc:
        raise FileUnanswered(f"{where}: {exc.strerror}") from None
    except Refused as exc:
        raise ConfigError(f"{where}: {exc}") from None
