"""`stoker rules`: the shipped alerting and recording rules with the runbook links an operator chooses.

Every alert's `runbook_url` is `<base>#<anchor>`, the anchor being the alert's name in lower case (the
runbook's `## StokerGpuLost` heading is `#stokergpulost`). The shipped rules use DEFAULT_BASE, the
runbook the Debian package installs on the node; a site with its own wiki rewrites the base when it
installs the rules, as the monitoring mixins apply their `runbookURLPattern`:

    stoker rules --runbook-base https://wiki.example.org/stoker/runbook > /etc/prometheus/rules/stoker.rules.yml

A base containing `%s` is a pattern: `%s` is replaced by the anchor and nothing is appended
(`https://wiki.example.org/stoker/%s`). Only the `runbook_url:` lines change; comments, order and
everything else are kept byte for byte.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

DEFAULT_BASE = "file:///opt/stoker/share/doc/stoker/runbook.md"
RULES_NAME = "stoker.rules.yml"
# `runbook_url: <anything>#<anchor>` on a line of its own, as alerts/stoker.rules.yml writes it
LINE = re.compile(r"^(?P<lead>\s*runbook_url:\s*)(?P<url>\S+)#(?P<anchor>[a-z0-9]+)[ \t]*$", re.M)
# a scheme, then no whitespace, quote, backslash or angle bracket: stays one plain YAML scalar
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s\"'\\<>`]+")


class RulesError(ValueError):
    pass


def shipped_rules() -> Path:
    """The rules file next to this installation: the package's (<venv>/share/doc/stoker/, where
    packaging/deb/build.sh puts it), else a source checkout's alerts/."""
    for candidate in (Path(sys.prefix) / "share" / "doc" / "stoker" / RULES_NAME,
                      Path(__file__).resolve().parent.parent / "alerts" / RULES_NAME):
        if candidate.is_file():
            return candidate
    raise RulesError(f"no {RULES_NAME} found in {sys.prefix}/share/doc/stoker/ or a source checkout: name the file")


def runbook_url(base: str, anchor: str) -> str:
    return base.replace("%s", anchor) if "%s" in base else f"{base}#{anchor}"


def with_runbook_base(text: str, base: str) -> str:
    """The rules file `text` with every alert's runbook_url at `base`; checked before it is returned."""
    if not URL.fullmatch(base) or "#" in base.replace("%s", ""):
        raise RulesError(f"runbook base {base!r}: an absolute URL (scheme:...) without spaces, quotes or a "
                         "fragment (the alert's anchor is appended, or replaces %s)")
    out = LINE.sub(lambda m: m["lead"] + runbook_url(base, m["anchor"]), text)
    try:
        alerts = [r for g in yaml.safe_load(out)["groups"] for r in g["rules"] if "alert" in r]
    except (yaml.YAMLError, TypeError, KeyError) as exc:
        raise RulesError(f"not a Prometheus rules file: {str(exc).splitlines()[0]}") from None
    if not alerts:
        raise RulesError("no alerting rule in the file")
    for rule in alerts:
        got = rule.get("annotations", {}).get("runbook_url")
        if got != runbook_url(base, rule["alert"].lower()):
            raise RulesError(f"{rule['alert']}: runbook_url {got!r} is not <base>#{rule['alert'].lower()}")
    return out
