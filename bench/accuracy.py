"""Verdict accuracy over the adversarial suite and the built-in scenarios, as the table in docs/VERDICTS.md.

Each case is played on a simulated clock at a 1 s interval (stoker.sim.drive) and judged
against its file's expectations (stoker.sim.judge): right or wrong, the time from each
expected verdict's window to the verdict, and the verdict changes over the run.

    python -m bench.accuracy [--write docs/VERDICTS.md] [--out FILE]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

from bench.common import emit
from stoker import logs
from stoker.sim import scenarios
from stoker.sim.drive import SimDrive
from stoker.sim.judge import judge, run_length

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


def cases() -> list[str]:
    return [str(p) for p in sorted((ROOT / "tests" / "scenarios").glob("*.toml"))] + scenarios.builtin_names()


def run(names: list[str]) -> dict:
    rows = []
    for i, name in enumerate(names, 1):
        scenario = scenarios.get(name)
        with tempfile.TemporaryDirectory() as root:
            drive = SimDrive(scenario, root)
            drive.run(run_length(scenario))
            j = judge(scenario, drive.samples, drive.outcomes())
            drive.close()
        rows.append({"case": Path(name).stem, "description": scenario.description, "right": j.right,
                     "failures": j.failures, "time_to_verdict_s": j.time_to_verdict, "flaps": j.flaps,
                     "suite": "adversarial" if name.endswith(".toml") else "built-in"})
        print(f"[{i}/{len(names)}] {rows[-1]['case']}: {'right' if j.right else 'WRONG'}", flush=True)
    return {"cases": rows, "right": sum(r["right"] for r in rows), "total": len(rows)}


def table(result: dict) -> str:
    lines = [f"{result['right']} of {result['total']} cases right (1 s interval, `python -m bench.accuracy`).", "",
             "| case | suite | what happens | result | time to verdict (s) | verdict changes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["cases"]:
        ttv = ", ".join(f"{t:g}" for t in r["time_to_verdict_s"]) or "-"
        verdict = "right" if r["right"] else "**wrong**: " + "; ".join(r["failures"])
        lines.append(f"| `{r['case']}` | {r['suite']} | {r['description']} | {verdict} | {ttv} | {r['flaps']} |")
    times = [t for r in result["cases"] for t in r["time_to_verdict_s"]]
    if times:
        lines += ["", f"Time to verdict over all expected verdicts: median {statistics.median(times):g} s, "
                      f"worst {max(times):g} s."]
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    doc = path.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="replace the accuracy table in this markdown file")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args()
    logs.configure("console", level=logging.ERROR)
    result = run(cases())
    if args.write:
        write(Path(args.write), table(result))
    emit("accuracy", result, args.out)


if __name__ == "__main__":
    main()
