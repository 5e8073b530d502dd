"""Mutation testing of stoker/detect/ with mutmut, the package index's tool, beside bench/mutation.py.

mutmut 3 changes more than bench/mutation.py does (string literals, log messages, default
arguments, `None` for an expression) but only inside functions: the engine's tables in
detect/policy.py, module-level rows, are never changed by it, which is why bench/mutation.py exists.
Each reports its own score (docs/VERDICTS.md).

mutmut copies tests/ into its mutants/ folder following symbolic links, and the sysfs fixture tree's
links loop as sysfs's do; so it runs in a copy of this tree whose tests/ is renamed `t/`, with the
selected test files copied and the fixtures linked, not copied. mutmut runs, for each mutant, the
selected tests that cover the mutated function (it records which in a first run).

    pip install 'mutmut>=3.8'
    python -m bench.mutmut_detect [--files stoker/detect/state.py ...] [--tests tests/test_detect.py ...]
                                  [--children 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from bench.common import emit

ROOT = Path(__file__).resolve().parent.parent
NOT_MUTATED = ("__init__.py", "goodput.py", "peer.py")
"""goodput.py and peer.py are specified by scenario and cluster tests (seconds each), not unit tests."""
TESTS = ("tests/test_detect.py", "tests/test_rdma.py", "tests/test_hardening_files.py",
         "tests/test_checkpoint_events.py", "tests/test_state_file.py", "tests/test_evidence_signals.py")
"""The engine's in-process tests (bench/mutation.py runs the same). Those marked slow are left out: they start
the agent in a child process, which imports the package without mutmut's trampolines."""
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
RESULT = re.compile(r"^\s*stoker\.detect\.(\w+)\.\S+: (.+)$")


def prepare(tree: Path, files: list[str], tests: list[str]) -> None:
    """A copy of this tree that mutmut can work in (module doc)."""
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "mutants", "__pycache__", "docs", "packaging", "dashboards"))
    (tree / "tests").rename(tree / "t")
    selected = [t.replace("tests/", "t/", 1) for t in tests]
    modules = sorted(f"t/{p.name}" for p in (tree / "t").glob("*.py"))  # a selected test may import another's helpers
    for name in modules:
        path = tree / name
        path.write_text(path.read_text().replace("from tests.", "from t.").replace("import tests.", "import t."))
    copied = [*modules, "bench/"]
    with open(tree / "pyproject.toml", "a") as f:
        f.write("\n[tool.mutmut]\n"
                'source_paths = ["stoker/"]\n'
                f"only_mutate = {files!r}\n"
                f"pytest_add_cli_args_test_selection = {selected!r}\n"
                'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "-m", "not slow"]\n'
                f"also_copy = {copied!r}\n".replace("'", '"'))
    (tree / "mutants" / "t").mkdir(parents=True)
    (tree / "mutants" / "t" / "fixtures").symlink_to(tree / "t" / "fixtures")


def tally(results: str) -> dict[str, Counter]:
    """file -> Counter of mutmut's statuses, from `mutmut results --all true`."""
    out: dict[str, Counter] = {}
    for line in results.splitlines():
        m = RESULT.match(line)
        if m:
            out.setdefault(f"{m.group(1)}.py", Counter())[m.group(2).strip()] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="+", default=sorted(
        f"stoker/detect/{p.name}" for p in (ROOT / "stoker" / "detect").glob("*.py") if p.name not in NOT_MUTATED))
    parser.add_argument("--tests", nargs="+", default=list(TESTS))
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        prepare(tree, args.files, args.tests)
        print(f"mutmut on {len(args.files)} files with {', '.join(args.tests)} (its progress below)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.children)],
                       cwd=tree, check=True, stdout=sys.stderr)
        results = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=tree,
                                 check=True, capture_output=True, text=True).stdout
    counts = tally(results)
    files = {}
    for name, c in sorted(counts.items()):
        total = sum(c.values())
        killed = sum(n for status, n in c.items() if status in KILLED)
        files[name] = {"mutants": total, "killed": killed, "statuses": dict(c)}
        print(f"{name:18s} {killed:5d} of {total:5d} killed ({100 * killed / total:.1f}%)", file=sys.stderr)
    total = sum(f["mutants"] for f in files.values())
    killed = sum(f["killed"] for f in files.values())
    emit("mutmut", {"tool": f"mutmut {version('mutmut')}", "tests": args.tests, "files": files, "mutants": total, "killed": killed,
                    "score": round(killed / total, 4) if total else None,
                    "seconds": round(time.monotonic() - started, 1)}, args.out)


if __name__ == "__main__":
    main()
