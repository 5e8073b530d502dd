"""The metrics contract (docs/METRICS.md) parsed into {name: (type, labels)}."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "METRICS.md"


def contract() -> dict[str, tuple[str, frozenset[str]]]:
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith(("stoker_", "process_")):
            continue
        kind = cells[1].split()[0]
        labels = frozenset(re.sub(r"\(.*?\)", "", cells[2]).replace(" ", "").split(",")) - {""}
        for name in (n.strip() for n in cells[0].split(",")):
            out[name] = (kind, labels)
    return out
