"""The configuration examples operators copy: valid for the real tools, routed as documented; the
manual page generated from the parser; the Debian maintainer scripts on a fake root."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import stat
import subprocess
import typing
from pathlib import Path

import pytest
import yaml

from tests.conftest import need_binary

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
RULES = Path(__file__).resolve().parent.parent / "alerts" / "stoker.rules.yml"


def test_prometheus_example_is_valid_with_the_shipped_rules(tmp_path):
    config = yaml.safe_load((PACKAGING / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"][1]["file_sd_configs"][0]["files"] = [str(PACKAGING / "prometheus" / "targets" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([need_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_file_sd_targets_carry_the_node_label():
    for path in (PACKAGING / "prometheus" / "targets").glob("*.yml"):
        for group in yaml.safe_load(path.read_text()):
            assert group["labels"]["node"] and group["targets"]


def test_alertmanager_example_is_valid_and_routes_by_severity():
    config = PACKAGING / "alertmanager" / "alertmanager.yml"
    amtool = need_binary("amtool")
    check = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def route(*labels: str) -> str:
        out = subprocess.run([amtool, "config", "routes", "test", f"--config.file={config}", *labels],
                             capture_output=True, text=True)
        return out.stdout.strip()

    assert route("alertname=StokerGpusStarvedByStorage", "severity=critical", "node=n1") == "gpu-oncall-pager"
    assert route("alertname=StokerGpusStarvedByHost", "severity=warning", "node=n1") == "tickets"
    assert route("alertname=StokerJobHeldBackByNode", "severity=critical", "job_id=4242", "node=n7") == \
        "gpu-oncall-pager"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((PACKAGING / "grafana" / "provisioning" / "datasources" / "stoker.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((PACKAGING / "grafana" / "provisioning" / "dashboards" / "stoker.yml").read_text())
    assert dash["providers"][0]["type"] == "file" and dash["providers"][0]["options"]["path"]


def test_remote_write_and_federation_examples_are_valid(tmp_path):
    for name in ("remote-write.yml", "federation.yml"):
        config = yaml.safe_load((PACKAGING / "prometheus" / name).read_text())
        if "rule_files" in config:
            config["rule_files"] = [str(RULES)]
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run([need_binary("promtool"), "check", "config", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, name + result.stdout + result.stderr


def test_federation_matches_every_recording_rule():
    import re
    match = yaml.safe_load((PACKAGING / "prometheus" / "federation.yml").read_text())[
        "scrape_configs"][0]["params"]["match[]"][0]
    pattern = re.search(r'__name__=~"([^"]+)"', match).group(1)
    for record in re.findall(r"record: (\S+)", RULES.read_text()):
        assert re.fullmatch(pattern, record), f"{record} is not federated"


# The shipped configuration, /etc/stoker/stoker.toml (a conffile operators edit).

SHIPPED_CONFIG = PACKAGING / "stoker.toml"
COMMENTED_OUT = re.compile(r"^# ?(?=\[\[?[a-z_.]+\]\]?|[a-z_]+ = )", re.MULTILINE)
"""A commented-out key (`# interval = 1.0`) or table (`# [[probes.targets]]`), not prose."""


def _config_keys(cls, prefix: str = ""):
    """Every key stoker/config.py declares, dotted (`agent.listen`, `probes.targets.mountpoint`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, key = hints[f.name], prefix + f.name
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
        if dataclasses.is_dataclass(kind):
            yield from _config_keys(kind, key + ".")
        elif dataclasses.is_dataclass(item):
            yield key
            yield from _config_keys(item, key + ".")
        else:
            yield key


def _file_keys(table: dict, prefix: str = ""):
    """Every key of a parsed TOML file, dotted as _config_keys writes them (an array of tables by its keys)."""
    for name, value in table.items():
        key = prefix + name
        if isinstance(value, dict):
            yield from _file_keys(value, key + ".")
            continue
        yield key
        if isinstance(value, list) and all(isinstance(row, dict) for row in value):
            for row in value:
                yield from _file_keys(row, key + ".")


def _value(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def test_the_shipped_configuration_names_every_key_with_its_default(tmp_path):
    """packaging/stoker.toml loads as shipped; every key of stoker/config.py is in it, set or commented out, but
    [sim] (a simulated node never reads the service's file: config.path_for); uncommented, it still loads, and
    each value shown is the default, or an example for a key that is empty or 0 by default (its header says so).
    Keys added to the configuration (inventory, agent.process_metrics) were once missing from it."""
    from stoker import config

    shipped = config.parse_toml(SHIPPED_CONFIG.read_text())
    config.load(SHIPPED_CONFIG)
    uncommented = tmp_path / "stoker.toml"
    uncommented.write_text(COMMENTED_OUT.sub("", SHIPPED_CONFIG.read_text()))
    shown = config.load(uncommented)

    declared = {k for k in _config_keys(config.Config) if not k.startswith("sim.")}
    listed = set(_file_keys(config.parse_toml(uncommented.read_text())))
    assert declared - listed == set(), "keys packaging/stoker.toml does not mention"
    assert not any(k.startswith("sim.") for k in listed), "the service's file shows [sim], which it never reads"
    defaults = config.Config()
    for key in sorted(listed - set(_file_keys(shipped))):
        if key.startswith("probes.targets."):  # a probe target's keys: the default has no target
            continue
        default = _value(defaults, key)
        if default:
            assert _value(shown, key) == default, f"{key}: shown as {_value(shown, key)!r}, the default is {default!r}"


# The manual page, generated from the argparse definitions (stoker/manpage.py).

def _subcommands(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _section(page: str, title: str) -> str:
    """The roff between `.SS "title"` and the next section or subsection."""
    start = page.index(f'.SS "{title}"')
    end = min((i for i in (page.find("\n.SS ", start + 1), page.find("\n.SH ", start + 1)) if i > 0), default=len(page))
    return page[start:end]


def _roff(text: str) -> str:
    return text.replace("-", "\\-")


def test_man_page_names_every_subcommand_and_option():
    from stoker.cli import build_parser
    from stoker.manpage import render

    parser = build_parser()
    page = render(parser)
    assert page.startswith(".TH STOKER 1 ") and "\n.SH NAME\nstoker \\- " in page
    for action in parser._actions:
        for option in action.option_strings:
            assert f"\\fB{_roff(option)}\\fR" in page, option
    for name, sub in _subcommands(parser).items():
        assert f'.SY "stoker {name}"' in page, name
        section = _section(page, f"stoker {name}")
        for action in sub._actions:
            for option in action.option_strings:
                assert f"\\fB{_roff(option)}\\fR" in section, (name, option)
            for choice in action.choices or []:
                assert f"\\fB{_roff(str(choice))}\\fR" in section, (name, choice)
            if action.metavar:
                assert f"\\fI{_roff(action.metavar)}\\fR" in section, (name, action.metavar)
            if action.help and action.help != argparse.SUPPRESS:
                assert action.help[1:25] in section, (name, action.help)


def test_every_argument_says_what_it_is():
    """`stoker check --sysfs-root DIR` and `--procfs-root DIR`, and `stoker checkpoint`'s `{start|end}`,
    stood in the manual page (and in --help) with nothing under them: every argument of every command
    has a help text, which the page prints."""
    from stoker.cli import build_parser
    from stoker.manpage import render

    parser = build_parser()
    page = render(parser)
    for name, sub in _subcommands(parser).items():
        section = _section(page, f"stoker {name}")
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert action.help[1:25] in section, (name, action.help)


def test_man_page_follows_the_parser():
    from stoker.cli import build_parser
    from stoker.manpage import render

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    extra = sub.add_parser("frobnicate", help="a command added later")
    extra.add_argument("--widgets", metavar="N", help="how many widgets")
    section = _section(render(parser), "stoker frobnicate")
    assert "A command added later" in section and "\\fB\\-\\-widgets\\fR \\fIN\\fR" in section


def _synopses(page: str) -> dict[str, str]:
    """Each `.SY "prog"` block of the page as plain text (the program, then its arguments): fonts
    dropped, roff escapes undone."""
    out = {}
    for prog, body in re.findall(r'^\.SY "([^"]+)"\n(.*?)^\.YS$', page, re.M | re.S):
        text = re.sub(r"\\f[BIR]", "", body).replace("\\~", " ").replace("\\-", "-").replace("\\&", "")
        prog = prog.replace("\\-", "-")
        out[prog] = " ".join([prog, *text.split()])
    return out


def test_man_page_synopsis_is_argparse_usage():
    """The synopsis once showed `stoker rules RULES` as required (it is optional) and put the options in
    another order than `stoker rules --help`: it now is argparse's own usage, for every command."""
    from stoker.cli import build_parser
    from stoker.manpage import render

    parser = build_parser()
    synopses = _synopses(render(parser))
    parsers = {"stoker": parser, **{f"stoker {n}": sub for n, sub in _subcommands(parser).items()}}
    assert set(synopses) == set(parsers)
    for prog, p in parsers.items():
        usage = " ".join(p.format_usage().split())
        assert usage == f"usage: {synopses[prog]}", prog
    assert synopses["stoker rules"] == "stoker rules [-h] [--runbook-base URL] [RULES]"


def test_man_page_renders_without_groff_warnings(tmp_path):
    from stoker.manpage import render

    page = tmp_path / "stoker.1"
    page.write_text(render())
    # what lintian runs on every manual page
    result = subprocess.run([need_binary("man"), "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
                            capture_output=True, text=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert result.returncode == 0 and not result.stderr, result.stderr


# The maintainer scripts, run as dpkg runs them for `dpkg --instdir` (DPKG_ROOT), on a fake root.

def _maintainer_script(root: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DPKG_ROOT": str(root), "DPKG_MAINTSCRIPT_PACKAGE": "stoker",
           "DPKG_MAINTSCRIPT_NAME": name}
    return subprocess.run(["sh", str(PACKAGING / "deb" / name), *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture
def fake_root(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("useradd --prefix and chgrp need root")
    for tool in ("useradd", "groupadd", "usermod", "deb-systemd-helper"):
        need_binary(tool)
    root = tmp_path / "root"
    (root / "etc/stoker").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc/gshadow").write_text("root:*::\n")
    (root / "lib/systemd/system").mkdir(parents=True)
    shutil.copy(PACKAGING / "systemd" / "stoker.service", root / "lib/systemd/system/stoker.service")
    shutil.copy(PACKAGING / "stoker.toml", root / "etc/stoker/stoker.toml")
    os.chmod(root / "etc/stoker/stoker.toml", 0o640)
    host = {name: Path("/etc", name).read_bytes() for name in ("passwd", "group")}
    yield root
    assert host == {name: Path("/etc", name).read_bytes() for name in ("passwd", "group")}, "the host was changed"


def _group(root: Path, name: str) -> tuple[int, list[str]]:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), [m for m in fields[3].split(",") if m]
    raise AssertionError(f"no group {name}")


def test_postinst_creates_the_hint_token_once_readable_by_stoker_hints(fake_root):
    result = _maintainer_script(fake_root, "postinst", "configure", "")
    assert result.returncode == 0, result.stdout + result.stderr
    hints_gid, members = _group(fake_root, "stoker-hints")
    assert members == ["stoker"]
    token = fake_root / "etc/stoker/hint-token"
    st = token.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, hints_gid, 0o640)
    assert re.fullmatch(r"[0-9a-f]{64}\n", token.read_text())
    assert (fake_root / "etc/stoker/stoker.toml").stat().st_gid == _group(fake_root, "stoker")[0]
    assert (fake_root / "etc/systemd/system/multi-user.target.wants/stoker.service").is_symlink()
    # the shipped configuration turns the hint API on with this very file
    assert 'token_file = "/etc/stoker/hint-token"' in (fake_root / "etc/stoker/stoker.toml").read_text()

    first = token.read_text()
    again = _maintainer_script(fake_root, "postinst", "configure", "0.1.0")  # an upgrade
    assert again.returncode == 0, again.stderr
    assert token.read_text() == first and _group(fake_root, "stoker-hints")[1] == ["stoker"]

    purge = _maintainer_script(fake_root, "postrm", "purge")
    assert purge.returncode == 0, purge.stderr
    assert not (fake_root / "etc/stoker").exists()
    assert not (fake_root / "etc/systemd/system/multi-user.target.wants/stoker.service").exists()
    assert "stoker-hints:" in (fake_root / "etc/group").read_text()  # kept: training users may be in it


def test_postinst_never_replaces_an_existing_token(fake_root):
    token = fake_root / "etc/stoker/hint-token"
    token.write_text("the-site-s-own-token-0123456789\n")
    os.chmod(token, 0o600)
    result = _maintainer_script(fake_root, "postinst", "configure", "")
    assert result.returncode == 0, result.stderr
    assert token.read_text() == "the-site-s-own-token-0123456789\n"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.stat().st_gid == 0


def test_postinst_keeps_a_service_user_created_beforehand_with_the_fleet_s_uid(fake_root):
    """docs/OPERATIONS.md: NFS checks numeric ids, so a site creates `stoker` with one uid on every node
    before installing; the package then uses that user as it is (useradd alone would pick the next free
    system uid, which differs from node to node)."""
    with open(fake_root / "etc/passwd", "a") as f:
        f.write("stoker:x:9477:9477:Stoker telemetry agent:/nonexistent:/usr/sbin/nologin\n")
    with open(fake_root / "etc/group", "a") as f:
        f.write("stoker:x:9477:\n")
    with open(fake_root / "etc/shadow", "a") as f:
        f.write("stoker:!:19000::::::\n")
    with open(fake_root / "etc/gshadow", "a") as f:
        f.write("stoker:!::\n")
    result = _maintainer_script(fake_root, "postinst", "configure", "")
    assert result.returncode == 0, result.stdout + result.stderr
    users = [line for line in (fake_root / "etc/passwd").read_text().splitlines() if line.startswith("stoker:")]
    assert users == ["stoker:x:9477:9477:Stoker telemetry agent:/nonexistent:/usr/sbin/nologin"]
    assert _group(fake_root, "stoker")[0] == 9477
    assert _group(fake_root, "stoker-hints")[1] == ["stoker"]
    assert (fake_root / "etc/stoker/stoker.toml").stat().st_gid == 9477


def test_lintian_overrides_each_state_their_reason():
    lines = (PACKAGING / "deb" / "lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert line.startswith("stoker: ") and lines[i - 1].startswith("# "), line
