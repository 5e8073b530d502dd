"""The manual page stoker(1), generated from the argparse definitions in stoker.cli.build_parser().

Every command, option, metavar, choice and help text comes from the parser itself, so the page
cannot drift from what `stoker` accepts; only the prose around them (description, exit status,
files, environment) is written here. The Debian package ships it gzipped as
/usr/share/man/man1/stoker.1.gz (packaging/deb/build.sh):

    python -m stoker.manpage > stoker.1
"""

from __future__ import annotations

import argparse
import re
import sys

from stoker import __version__

SUMMARY = "per-node telemetry agent that says when GPUs are starved, and by what"

DESCRIPTION = r"""
.B stoker
samples NVML (GPM), RoCE port counters, NFS client statistics and NAS probes on one node,
exports them as Prometheus metrics, and says when the GPUs are starved, and by what
(storage, network, host or the job itself).
On a node it runs as the systemd service
.BR stoker.service ,
which starts
.B stoker run
with the configuration in
.IR /etc/stoker/stoker.toml .
.B stoker run
and
.B stoker check
read the file given with
.BR \-\-config ,
else
.I /etc/stoker/stoker.toml
when it exists (with
.BR \-\-simulate ,
only
.BR \-\-config ),
and their options override the file;
.B stoker replay
reads only
.BR \-\-config
(its node is simulated);
.B stoker checkpoint
and
.B stoker rules
read no configuration.
"""

EXIT_STATUS = r"""
.TP
.B 0
Success: the agent stopped cleanly, the node is healthy
.RB ( check ),
the verdicts were right
.RB ( replay ),
the hint was accepted
.RB ( checkpoint ).
.TP
.B 1
The node is unhealthy
.RB ( check ),
a verdict was wrong
.RB ( replay ),
or the agent refused the hint
.RB ( checkpoint ).
.TP
.B 2
Stoker could not do what was asked: a configuration error (the message names the key),
a listen address already in use, a bad scenario, a node that could not be checked
(or that had nothing to check), or an agent that could not be reached.
The unit's
.B RestartPreventExitStatus=2
keeps systemd from restarting it in a loop.
.TP
.B 75
.RB ( run )
The NVIDIA driver was replaced under the running agent, whose process holds the old
NVML library: the unit's
.B Restart=on\-failure
starts it again on the new driver.
"""

FILES = r"""
.TP
.I /etc/stoker/stoker.toml
The configuration (every key is optional).
After a change:
.BR "systemctl reload stoker" .
.TP
.I /etc/stoker/hint\-token
The bearer token of the checkpoint hint API, created at install;
readable by root, the service and the members of the group
.BR stoker\-hints .
.TP
.I /var/lib/stoker/state.json
The running job's learned level, kept across restarts, and how many GPUs and
RDMA ports the node has shown (unless set in
.BR [inventory] ).
.TP
.I /opt/stoker/share/doc/stoker/
Operations guide, metrics, verdicts, alert rules, runbook and dashboards.
"""

ENVIRONMENT = r"""
.TP
.B STOKER_HINT_URL
The agent's hint API for
.B stoker checkpoint
(default http://127.0.0.1:9478).
.TP
.B STOKER_HINT_TOKEN_FILE
The file holding its bearer token (default
.IR /etc/stoker/hint\-token ).
.TP
.B STOKER_HINT_TOKEN
The token itself, instead of a file.
"""

SEE_ALSO = r"""
.BR systemctl (1),
.BR journalctl (1);
.I /opt/stoker/share/doc/stoker/OPERATIONS.md
"""


def escape(text: str, literal: bool = False) -> str:
    """Text for a roff line: backslashes escaped, no line starting as a request; `literal` (an
    option, a metavar, a value typed as shown): its hyphens are minus signs, so it copies right."""
    text = text.replace("\\", "\\e")
    if literal:
        text = text.replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    text = action.help % params if "%" in action.help else action.help
    return text[0].upper() + text[1:]


def _value(action: argparse.Action) -> str:
    """The argument an action takes, in roff: its choices in bold, else its metavar in italics."""
    if action.choices is not None:
        return "{" + "|".join(f"\\fB{escape(str(c), True)}\\fR" for c in action.choices) + "}"
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    return f"\\fI{escape(str(metavar), True)}\\fR"


def _usage(action: argparse.Action) -> str:
    """An action as its entry in the option list: every option string, with its argument."""
    if not action.option_strings:
        return _value(action)
    if action.nargs == 0:
        return ", ".join(f"\\fB{escape(name, True)}\\fR" for name in action.option_strings)
    value = _value(action)
    return ", ".join(f"\\fB{escape(n, True)}\\fR " + (f"[{value}]" if action.nargs == "?" else value)
                     for n in action.option_strings)


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
            and a.help != argparse.SUPPRESS]


def usage_line(parser: argparse.ArgumentParser) -> str:
    """argparse's own usage of `parser`, on one line, without "usage: ": which arguments are
    optional, their order and their grouping are argparse's own, not a copy of its rules."""
    formatter = argparse.HelpFormatter(parser.prog, width=1 << 16)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _words(usage: str) -> list[str]:
    """The usage split at the spaces between arguments, never inside brackets."""
    words, depth, start = [], 0, 0
    for i, c in enumerate(usage + " "):
        depth += (c in "[({") - (c in "])}")
        if c == " " and depth == 0:
            if i > start:
                words.append(usage[start:i])
            start = i + 1
    return words


def _styled(word: str, options: set[str]) -> str:
    """A word of the usage in roff: option names and choices bold, metavars italic, an option and
    its value joined by a non-breaking space (a line never breaks between them)."""
    tokens = re.findall(r"\{[^}]*\}|\.\.\.|[^\s\[\]()|{}]+|\s+|.", word)
    out = []
    for i, token in enumerate(tokens):
        if token.startswith("{"):
            out.append("{" + ",".join(f"\\fB{escape(c, True)}\\fR" for c in token[1:-1].split(",")) + "}")
        elif token in options:
            out.append(f"\\fB{escape(token, True)}\\fR")
        elif token.isspace():
            out.append("\\~" if i and tokens[i - 1] in options and tokens[i + 1] != "|" else token)
        elif token in ("[", "]", "(", ")", "|", "..."):
            out.append(token)
        else:
            out.append(f"\\fI{escape(token, True)}\\fR")
    styled = "".join(out)
    return "\\&" + styled if styled.startswith((".", "'")) else styled  # not a request: `...` starts a line


def _synopsis(parser: argparse.ArgumentParser) -> list[str]:
    options = {o for a in parser._actions for o in a.option_strings}
    words = _words(usage_line(parser)[len(parser.prog):].strip())
    return [f'.SY "{escape(parser.prog, True)}"', *(_styled(w, options) for w in words), ".YS"]


def _options(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    lines = []
    for action in _arguments(parser):
        lines += [".TP", _usage(action), escape(_help(action, prog)) or "\\&"]
    return lines


def _commands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order they were defined."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return []


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The page, in man(7) roff."""
    if parser is None:
        from stoker.cli import build_parser
        parser = build_parser()
    prog = parser.prog
    commands = _commands(parser)
    out = [f'.TH {prog.upper()} 1 "" "{prog} {__version__}" "User Commands"',
           ".SH NAME", f"{prog} \\- {escape(SUMMARY)}",
           ".SH SYNOPSIS"]
    out += _synopsis(parser)
    for _, _, sub in commands:
        out += _synopsis(sub)
    out += [".SH DESCRIPTION", *DESCRIPTION.strip().splitlines()]
    out += [".SH OPTIONS", *_options(parser, prog)]
    out += [".SH COMMANDS"]
    for name, text, sub in commands:
        out += [f'.SS "{prog} {escape(name, True)}"', escape(text[0].upper() + text[1:]) if text else "\\&"]
        out += _options(sub, f"{prog} {name}")
    for title, body in (("EXIT STATUS", EXIT_STATUS), ("ENVIRONMENT", ENVIRONMENT), ("FILES", FILES),
                        ("SEE ALSO", SEE_ALSO)):
        out += [f".SH {title}", *body.strip().splitlines()]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
