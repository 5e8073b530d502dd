"""The fuzz seed printed in the header is the one every test used, with pytest-xdist's workers too
(scripts/test.sh runs the suite on several): a failure's printed seed must replay it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import pytest

@pytest.mark.parametrize("n", range(6))
def test_seed(request, n):
    with open({out!r}, "a") as f:
        f.write(str(request.config.getoption("hypothesis_seed")) + "\\n")
'''


def run_probe(tmp_path: Path, *args: str) -> tuple[str, set[str]]:
    out = tmp_path / "seeds.txt"
    (tmp_path / "test_probe.py").write_text(PROBE.format(out=str(out)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), *args, str(tmp_path / "test_probe.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    header = re.search(r"fuzz seed (\d+): replay with --hypothesis-seed=\1", done.stdout)
    assert header, done.stdout
    return header.group(1), set(out.read_text().split())


def test_workers_use_the_seed_the_header_printed(tmp_path):
    printed, used = run_probe(tmp_path, "-n", "2")
    assert used == {printed}


def test_a_given_seed_is_the_one_used_and_printed(tmp_path):
    printed, used = run_probe(tmp_path, "-n", "2", "--hypothesis-seed=12345")
    assert printed == "12345" and used == {"12345"}
