"""The Debian package: built, installed with dpkg into a throwaway root, and run from there."""

from __future__ import annotations

import re
import shutil
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


def test_stoker_version_runs_from_the_installed_virtualenv(installed):
    root, _ = installed
    version = re.search(r'__version__ = "(.+)"', (REPO / "stoker" / "__init__.py").read_text()).group(1)
    result = subprocess.run([str(root / "opt/stoker/bin/python"), "-m", "stoker", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"stoker {version}", result.stderr
    assert (root / "opt/stoker/bin/stoker").read_text().startswith("#!/opt/stoker/bin/python")
    assert (root / "usr/bin/stoker").is_symlink()


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


def test_conffile_and_purge(installed):
    root, deb = installed
    info = subprocess.run(["dpkg-deb", "--info", str(deb)], capture_output=True, text=True).stdout
    assert "Package: stoker" in info and "Depends: python3" in info
    contents = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True).stdout
    assert b"conffiles" in contents
    purge = subprocess.run(["dpkg", f"--instdir={root}", f"--admindir={root}/var/lib/dpkg",
                            "--force-script-chrootless", "--purge", "stoker"], capture_output=True, text=True)
    assert purge.returncode == 0, purge.stderr
    assert not (root / "opt/stoker/bin/stoker").exists() and not (root / "etc/stoker").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/stoker.service").exists()
