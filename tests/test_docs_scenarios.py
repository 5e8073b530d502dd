"""The scenario names the docs and the CLI give are the ones that exist."""

from __future__ import annotations

import re
from pathlib import Path

from stoker.cli import build_parser
from stoker.sim.scenarios import builtin_names

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_exactly_the_built_in_scenarios():
    text = (ROOT / "README.md").read_text()
    listed = text.split("or a built-in one:", 1)[1].split(".\n", 1)[0]
    assert sorted(set(re.findall(r"`([a-z-]+)`", listed))) == builtin_names()


def test_run_help_names_every_built_in_scenario():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    help_text = re.sub(r"-\s+", "-", run.format_help())  # argparse wraps at hyphens
    assert all(name in help_text for name in builtin_names())


def test_verdicts_doc_covers_every_built_in_scenario():
    text = (ROOT / "docs" / "VERDICTS.md").read_text()
    table = text.split("## The simulated node", 1)[1].split("## Accuracy", 1)[0]
    assert all(f"`{name}`" in table for name in builtin_names())
