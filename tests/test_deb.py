"""The Debian package: built, checked by lintian, installed with dpkg into a throwaway root, and
run from there."""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need_binary

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the package is built with Debian's /usr/bin/python3")
    need_binary("dpkg-deb")
    out = tmp_path_factory.mktemp("deb")
    built = subprocess.run([str(REPO / "packaging" / "deb" / "build.sh"), str(out)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    deb = Path(built.stdout.strip().splitlines()[-1])
    root = tmp_path_factory.mktemp("root")
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/updates").mkdir()
    (root / "var/lib/dpkg/status").touch()
    (root / "etc").mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        if Path("/etc", name).exists():
            shutil.copy(Path("/etc", name), root / "etc" / name)
    install = subprocess.run(["dpkg", f"--instdir={root}", f"--admindir={root}/var/lib/dpkg",
                              "--force-script-chrootless", "--force-depends", "-i", str(deb)],
                             capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    return root, deb


def test_lintian_finds_no_error_and_no_warning_without_a_reasoned_override(installed):
    _, deb = installed
    result = subprocess.run([need_binary("lintian"), "--display-info", "--show-overrides", str(deb)],
                            capture_output=True, text=True, timeout=600)
    tags = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "O:")]
    assert tags, result.stdout + result.stderr
    assert not [t for t in tags if t.startswith(("E:", "W:"))], "\n".join(t for t in tags if t[0] in "EW")
    assert not [t for t in tags if "unused-override" in t or "mismatched-override" in t]
    overridden = {t.split()[2] for t in tags if t.startswith("O:")}
    shipped = {line.split()[1] for line in (REPO / "packaging/deb/lintian-overrides").read_text().splitlines()
               if line.startswith("stoker: ")}
    assert overridden == shipped  # every override is used, and nothing else is overridden


def test_stoker_version_runs_from_the_installed_virtualenv(installed):
    root, _ = installed
    version = re.search(r'__version__ = "(.+)"', (REPO / "stoker" / "__init__.py").read_text()).group(1)
    result = subprocess.run([str(root / "opt/stoker/bin/python"), "-m", "stoker", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"stoker {version}", result.stderr
    assert (root / "opt/stoker/bin/stoker").read_text().startswith("#!/opt/stoker/bin/python")
    assert (root / "usr/bin/stoker").is_symlink()


def test_the_virtualenv_holds_only_what_runs_the_agent(installed):
    root, _ = installed
    venv = root / "opt/stoker"
    assert {p.name for p in (venv / "bin").iterdir()} - {"stoker"} <= {"python", "python3"} | {
        p.name for p in (venv / "bin").glob("python3.*")}
    site = next((venv / "lib").glob("python3.*/site-packages"))
    assert not list(site.glob("pip*")) and not list(site.glob("setuptools*"))
    assert not list(site.glob("yaml/_yaml*.so"))  # PyYAML's own copy of libyaml
    pure = subprocess.run([str(venv / "bin/python"), "-c", "import yaml; print(yaml.__with_libyaml__, "
                           "yaml.safe_load('a: [1, 2]'))"], capture_output=True, text=True, timeout=60)
    assert pure.stdout.strip() == "False {'a': [1, 2]}", pure.stderr


def test_depends_on_the_interpreter_the_virtualenv_was_built_for(installed):
    root, deb = installed
    depends = subprocess.run(["dpkg-deb", "--field", str(deb), "Depends"], capture_output=True, text=True).stdout
    pyver = re.match(r"python(3\.\d+), ", depends).group(1)
    assert (root / "opt/stoker/bin/python").resolve() == Path(f"/usr/bin/python{pyver}")
    assert "libc6 (>= " in depends  # the compiled modules', from dpkg-shlibdeps
    tag = "cpython-" + pyver.replace(".", "")
    for module in (root / "opt/stoker/lib").rglob("*.cpython-*.so"):
        assert tag in module.name, module  # nothing built for another Python
    sections = subprocess.run([need_binary("readelf"), "--section-headers", "--wide",
                               *map(str, (root / "opt/stoker/lib").rglob("*.so"))], capture_output=True, text=True)
    assert sections.returncode == 0 and " .symtab " not in sections.stdout and " .debug_" not in sections.stdout


def test_man_page_copyright_and_changelog(installed):
    root, _ = installed
    from stoker.manpage import render
    page = gzip.decompress((root / "usr/share/man/man1/stoker.1.gz").read_bytes()).decode()
    assert page == render()
    copyright = (root / "usr/share/doc/stoker/copyright").read_text()
    assert "/usr/share/common-licenses/Apache-2.0" in copyright
    for info in (root / "opt/stoker/lib").glob("python3.*/site-packages/*.dist-info"):
        name = info.name.split("-")[0]
        listed = {re.sub(r"[-_.]+", "_", line.split()[0]).lower() for line in copyright.splitlines()
                  if line and not line[0].isspace() and len(line.split()) == 2}
        if name != "stoker":
            assert name.lower() in listed, f"{name} is not in the copyright file"
    changelog = gzip.decompress((root / "usr/share/doc/stoker/changelog.gz").read_bytes()).decode()
    assert changelog.startswith("stoker (")


def test_unit_config_user_and_enablement(installed):
    root, _ = installed
    unit = root / "lib/systemd/system/stoker.service"
    assert unit.read_text() == (REPO / "packaging/systemd/stoker.service").read_text()
    verify = subprocess.run([need_binary("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True)
    assert "Command /opt/stoker/bin/stoker" in verify.stderr or verify.returncode == 0  # only the ExecStart path
    assert "stoker:" in (root / "etc/passwd").read_text()
    assert (root / "etc/systemd/system/multi-user.target.wants/stoker.service").is_symlink()
    config = root / "etc/stoker/stoker.toml"
    assert config.exists() and oct(config.stat().st_mode)[-3:] == "640"


def _gid(root: Path, group: str) -> int:
    return int(next(line.split(":")[2] for line in (root / "etc/group").read_text().splitlines()
                    if line.startswith(group + ":")))


def test_hint_token_created_once_for_the_service_and_stoker_hints(installed):
    root, deb = installed
    token = root / "etc/stoker/hint-token"
    st = token.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, _gid(root, "stoker-hints"), 0o640)
    members = next(line for line in (root / "etc/group").read_text().splitlines()
                   if line.startswith("stoker-hints:")).split(":")[3].split(",")
    assert "stoker" in members
    assert 'token_file = "/etc/stoker/hint-token"' in (root / "etc/stoker/stoker.toml").read_text()
    first = token.read_text()
    assert len(first.strip()) >= 16  # what the agent requires
    again = subprocess.run(["dpkg", f"--instdir={root}", f"--admindir={root}/var/lib/dpkg",
                            "--force-script-chrootless", "--force-depends", "-i", str(deb)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert token.read_text() == first  # an upgrade keeps it


def test_runbook_links_resolve_on_the_node_and_stoker_rules_rebases_them(installed):
    """The shipped rules' runbook_url (file:///opt/stoker/share/doc/stoker/runbook.md#...) names the
    runbook the package installs; the installed `stoker rules` finds the installed rules by itself."""
    root, _ = installed
    from stoker.rules import DEFAULT_BASE
    doc = root / "opt/stoker/share/doc/stoker"
    assert (root / DEFAULT_BASE.removeprefix("file:///")).read_text() == (REPO / "alerts/runbook.md").read_text()
    assert (doc / "stoker.rules.yml").read_text() == (REPO / "alerts/stoker.rules.yml").read_text()
    shipped = subprocess.run([str(root / "opt/stoker/bin/python"), "-m", "stoker", "rules"],
                             capture_output=True, text=True, timeout=60)
    assert shipped.returncode == 0 and shipped.stdout == (doc / "stoker.rules.yml").read_text(), shipped.stderr
    rebased = subprocess.run([str(root / "opt/stoker/bin/python"), "-m", "stoker", "rules",
                              "--runbook-base", "https://wiki.example.org/stoker"],
                             capture_output=True, text=True, timeout=60)
    assert rebased.returncode == 0, rebased.stderr
    assert f"runbook_url: {DEFAULT_BASE}" not in rebased.stdout
    assert "runbook_url: https://wiki.example.org/stoker#stokergpulost" in rebased.stdout


def test_grafana_provisioning_and_dashboards_ship_as_the_grafana_host_needs_them(installed):
    """docs/OPERATIONS.md ("Dashboards") copies them from a node: the provisioning files of
    packaging/grafana/provisioning/ and the dashboards their provider loads, unchanged."""
    root, _ = installed
    grafana = root / "opt/stoker/share/doc/stoker/grafana"
    expected = {f"provisioning/{p.relative_to(REPO / 'packaging/grafana/provisioning').as_posix()}": p
                for p in (REPO / "packaging/grafana/provisioning").rglob("*.yml")}
    expected |= {f"dashboards/{p.name}": p for p in (REPO / "dashboards").glob("*.json")}
    shipped = {p.relative_to(grafana).as_posix(): p for p in grafana.rglob("*") if p.is_file()}
    assert set(shipped) == set(expected)
    assert all(shipped[k].read_bytes() == expected[k].read_bytes() for k in expected)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in shipped.values())


def test_conffile_and_purge(installed):
    root, deb = installed
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True).stdout
    assert "Package: stoker" in info and re.search(r"Depends: python3\.\d+, ", info)
    contents = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True).stdout
    assert b"conffiles" in contents
    purge = subprocess.run(["dpkg", f"--instdir={root}", f"--admindir={root}/var/lib/dpkg",
                            "--force-script-chrootless", "--purge", "stoker"], capture_output=True, text=True)
    assert purge.returncode == 0, purge.stderr
    assert not (root / "opt/stoker/bin/stoker").exists() and not (root / "etc/stoker").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/stoker.service").exists()
