"""Writes /usr/share/doc/stoker/copyright for the .deb: Stoker's own license, then every Python
distribution the virtualenv bundles with its license (from its metadata) and where the license
texts its authors ship lie in the installed package. Run with the virtualenv's interpreter, so
that it lists exactly what was installed:

    VENV/bin/python packaging/deb/copyright.py VENV /opt/stoker > copyright
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

HEADER = """\
Stoker: per-node telemetry agent that says when GPUs are starved, and by what.
Homepage: https://github.com/stoker-telemetry/stoker

Copyright: 2026 the Stoker developers <stoker@example.org>
License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not
 use Stoker except in compliance with the License. Unless required by
 applicable law or agreed to in writing, software distributed under the
 License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS
 OF ANY KIND, either express or implied.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can
 be found in /usr/share/common-licenses/Apache-2.0.

Bundled software
----------------
/opt/stoker is a self-contained Python virtualenv. Besides Stoker it holds
these distributions from PyPI, each under its own license; the license texts
their authors ship are installed with them, at the paths given.
"""


def license_of(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    if meta.get("License-Expression"):
        return meta["License-Expression"]
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) < 60:
        return text
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return " / ".join(classifiers) or "see its license files"


def license_files(dist: metadata.Distribution, venv: Path, prefix: str) -> list[str]:
    files = []
    for file in dist.files or []:
        parts = Path(file).parts
        in_info = parts[0].endswith(".dist-info")
        named = Path(file).name.upper().startswith(("LICEN", "COPYING", "NOTICE", "AUTHORS"))
        if in_info and (named or "licenses" in parts):
            files.append(Path(dist.locate_file(file)))
    if not files:  # no license file in the wheel: the notice is in its modules' headers
        modules = [Path(dist.locate_file(f)) for f in dist.files or [] if len(f.parts) == 1 and f.suffix == ".py"]
        files = [path for path in modules if "copyright" in path.read_text(errors="replace")[:4096].lower()]
    return [prefix + "/" + str(path.resolve().relative_to(venv.resolve())) for path in sorted(files)]


def main(venv: str, prefix: str) -> int:
    venv_path = Path(venv)
    out = [HEADER]
    dists = sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower())
    for dist in dists:
        name = dist.metadata["Name"]
        if name.lower() == "stoker":
            continue
        out.append(f"\n{name} {dist.version}\nLicense: {license_of(dist)}")
        files = license_files(dist, venv_path, prefix)
        out.append(" " + ("\n ".join(files) if files else "(no license text shipped)"))
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
