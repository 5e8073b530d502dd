"""`stoker run | check | checkpoint | replay | rules | cluster | --version`: flags over the TOML configuration, clear
errors, exit codes.

Exit status 2 means the agent could not start as asked (a configuration
error); systemd's RestartPreventExitStatus=2 keeps such a unit from looping.
Exit status 75 means the NVIDIA driver was replaced under the running agent,
which only a new process can use, or that a file the agent reads at start did
not answer in time (a hung NFS mount): Restart=on-failure restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from stoker import __version__, config as config_mod, logs
from stoker.sim.scenarios import builtin_names

EXIT_CONFIG = 2
EXIT_RETRY = 75  # EX_TEMPFAIL, as agent/gpu.py's EXIT_DRIVER_REPLACED
CONFIG_HELP = (f"TOML configuration file (default: {config_mod.DEFAULT_FILE}, the service's, when it exists; "
               "none with --simulate)")


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an argument it does not know is its own error, shown with its own
    usage. argparse leaves such arguments to the top-level parser, whose usage lists none of the
    subcommand's options (`stoker run --bogus` printed `stoker [-h] [--version] {run,...} ...`)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed, extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stoker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stoker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    run.add_argument("--listen", metavar="HOST:PORT",
                     help=f"address to serve /metrics on (default 0.0.0.0:{config_mod.DEFAULT_PORT})")
    run.add_argument("--hint-listen", metavar="HOST:PORT",
                     help=f"address of the checkpoint and step hint API, served when checkpoint.token_file is "
                          f"set (default {config_mod.CheckpointConfig().listen}; loopback unless you mean it)")
    run.add_argument("--interval", type=float, metavar="SECONDS", help="sampling interval (default 1)")
    run.add_argument("--sysfs-root", metavar="DIR", help="where sysfs is mounted (default /sys)")
    run.add_argument("--procfs-root", metavar="DIR", help="where procfs is mounted (default /proc)")
    run.add_argument("--simulate", nargs="?", const="cycle", metavar="SCENARIO",
                     help=f"run on the built-in simulated XE9680 node: a scenario file (.toml) or one of "
                          f"{', '.join(builtin_names())} (default: cycle)")
    run.add_argument("--log-format", choices=["auto", "json", "console"], help="log format (default auto)")

    check = sub.add_parser("check", help="one-shot health check: exit 0 healthy, 1 unhealthy, 2 could not check")
    check.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    check.add_argument("--seconds", type=seconds, default=5.0, help="how long to sample (default 5)")
    check.add_argument("--sysfs-root", metavar="DIR", help="where sysfs is mounted (default /sys)")
    check.add_argument("--procfs-root", metavar="DIR", help="where procfs is mounted (default /proc)")
    check.add_argument("--simulate", nargs="?", const="healthy", metavar="SCENARIO",
                       help="check the simulated node, the scenario's fault already under way (default: healthy)")

    replay = sub.add_parser("replay", help="play a scenario on a simulated clock and judge the verdicts against "
                                           "its expectations: exit 0 right, 1 wrong, 2 bad scenario")
    replay.add_argument("scenario", metavar="SCENARIO", help="a scenario file (.toml) or a built-in name")
    replay.add_argument("--interval", type=seconds, default=1.0, help="sampling interval (default 1)")
    replay.add_argument("--seconds", type=seconds, help="how long to play (default: to the last expectation)")
    replay.add_argument("--config", metavar="FILE",
                        help="TOML configuration file: its thresholds (default: none, the node is simulated)")

    cluster = sub.add_parser("cluster", help="run a simulated cluster: an agent per node of a cluster scenario, "
                                             "on consecutive ports, in one process")
    cluster.add_argument("scenario", metavar="FILE", help="a cluster scenario (docs/SCENARIOS.md, \"Clusters\")")
    cluster.add_argument("--listen", default="127.0.0.1:9500", metavar="HOST:PORT",
                         help="the first node's address; the others take the next ports (default 127.0.0.1:9500)")
    cluster.add_argument("--ports", type=int, nargs="+", metavar="PORT", help="one port per node instead")
    cluster.add_argument("--targets", metavar="FILE",
                         help="write a Prometheus file_sd file of the nodes (their `node` labels) here")
    cluster.add_argument("--interval", type=float, default=1.0, help="each agent's sampling interval (default 1)")
    cluster.add_argument("--probe-interval", type=float, metavar="SECONDS",
                         help="NAS probe interval (each probe is a child process; default: the simulated node's)")
    cluster.add_argument("--started", metavar="FILE", help="write the Unix time the scenario's time 0 was here")

    hint = sub.add_parser("checkpoint", help="tell the local agent a checkpoint starts or ends")
    hint.add_argument("action", choices=["start", "end"], help="the checkpoint starts, or it ended")
    where = hint.add_mutually_exclusive_group(required=True)
    where.add_argument("--mountpoint", help="the NFS mountpoint written to")
    where.add_argument("--path", help="a path on it (the checkpoint directory)")
    hint.add_argument("--expected-bytes", type=int, help="with start: the checkpoint's size")
    hint.add_argument("--outcome", choices=["completed", "aborted"], default="completed", help="with end")
    hint.add_argument("--url", help="the agent's hint API (default $STOKER_HINT_URL or http://127.0.0.1:9478)")
    hint.add_argument("--token-file", help="default $STOKER_HINT_TOKEN_FILE or /etc/stoker/hint-token")

    rules = sub.add_parser("rules", help="print the alerting and recording rules, every alert's runbook_url "
                                         "at the runbook base given")
    rules.add_argument("file", nargs="?", metavar="RULES",
                       help="the rules file (default: the shipped stoker.rules.yml)")
    rules.add_argument("--runbook-base", metavar="URL",
                       help="where the runbook is: each runbook_url becomes URL#<alert name in lower case>, or "
                            "URL with %%s replaced by that name (default: the runbook the package installs, "
                            "file:///opt/stoker/share/doc/stoker/runbook.md)")
    return parser


def seconds(text: str) -> float:
    """A duration flag: a finite number of seconds above zero, up to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: must be above 0 and at most 86400 seconds")
    return value


FLAGS = {"listen": ("agent", "listen"), "interval": ("agent", "interval"), "sysfs_root": ("agent", "sysfs_root"),
         "procfs_root": ("agent", "procfs_root"), "log_format": ("agent", "log_format"),
         "hint_listen": ("checkpoint", "listen")}
"""Each flag that sets a configuration key: its section and key."""


def overrides_from(args: argparse.Namespace) -> dict:
    out: dict = {}
    for flag, (section, key) in FLAGS.items():
        if getattr(args, flag, None) is not None:
            out.setdefault(section, {})[key] = getattr(args, flag)
    return out


def config_path(args: argparse.Namespace) -> str | None:
    """The file this command reads (config.path_for: the same rule for every command)."""
    return config_mod.path_for(args.config, simulated=getattr(args, "simulate", None) is not None)


def simulated(cfg: config_mod.Config, name: str, stack: contextlib.ExitStack, at_fault: bool = False,
              keep_listen: bool = False):
    """The simulated node's platform, its kernel trees written under a fresh directory of its own
    (sim/rundir.py); returns the platform and the configuration pointed at them. `at_fault`: start
    where the scenario's fault begins. `keep_listen`: the hint API's address was given by flag."""
    from stoker.sim.rundir import run_directory
    from stoker.sim.scenarios import get as get_scenario
    from stoker.sim.simulation import Simulation

    scenario = get_scenario(name)  # a bad name or file is a configuration error, before anything is written
    root = stack.enter_context(run_directory("sim"))  # removed at the end, on SIGTERM, or by the next run
    sim = Simulation(scenario, root, cfg.sim.rdma_ports, skip=scenario.fault_at if at_fault else 0.0, held=True)
    return sim, sim.configure(cfg, keep_listen)


def cmd_check(args: argparse.Namespace) -> int:
    from stoker import check
    from stoker.agent import platform as platforms
    from stoker.agent.runtime import Agent

    path = config_path(args)  # the service's file: the thresholds, mounts and probes the service uses
    with contextlib.ExitStack() as stack:
        try:
            cfg = config_mod.load(path, overrides_from(args))
            if args.simulate is not None:
                sim, cfg = simulated(cfg, args.simulate, stack, at_fault=True)
                platform = sim.platform()
            else:
                platform = platforms.real()
        except (config_mod.ConfigError, ValueError) as exc:
            print(f"stoker: configuration error: {exc}", file=sys.stderr)
            return check.UNCHECKED
        logs.configure("console", level=logging.ERROR)
        report = asyncio.run(check.run_check(Agent(cfg, platform, checking=True), args.seconds))
    print(f"configuration: {path or 'defaults'}")
    check.print_report(report, sys.stdout)
    return report.exit_code()


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from stoker import hints
    try:
        if args.action == "start":
            answer = hints.start(args.path, args.mountpoint, args.expected_bytes, url=args.url,
                                 token_file=args.token_file)
        else:
            answer = hints.end(args.path, args.mountpoint, args.outcome, url=args.url, token_file=args.token_file)
    except hints.HintFailed as exc:
        print(f"stoker: {exc}", file=sys.stderr)
        return 1 if exc.status else 2
    print(" ".join(f"{k}={v}" for k, v in answer.items()))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from stoker.sim import replay
    from stoker.sim.scenarios import ScenarioError, get

    try:
        cfg = config_mod.load(config_mod.path_for(args.config, simulated=True))
        scenario = get(args.scenario)
        replay.limits(scenario, args.interval, args.seconds)
    except (config_mod.ConfigError, ScenarioError) as exc:
        print(f"stoker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure("console", level=logging.ERROR)
    judgement = replay.play(scenario, cfg, args.interval, args.seconds, sys.stdout)
    return 0 if judgement.right else 1


def cmd_cluster(args: argparse.Namespace) -> int:
    from stoker.sim import cluster
    return cluster.run(args)


def cmd_rules(args: argparse.Namespace) -> int:
    from stoker import rules
    try:
        text = config_mod.read_text(args.file or rules.shipped_rules())  # never blocks on a FIFO
        base = rules.DEFAULT_BASE if args.runbook_base is None else args.runbook_base
        sys.stdout.write(rules.with_runbook_base(text, base))
    except (config_mod.ConfigError, rules.RulesError) as exc:
        print(f"stoker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from stoker.agent import platform as platforms
    path = config_path(args)
    with contextlib.ExitStack() as stack:
        sim = None
        try:
            cfg = config_mod.load(path, overrides_from(args))
            if args.simulate is not None:
                sim, cfg = simulated(cfg, args.simulate, stack, keep_listen=args.hint_listen is not None)
                platform = sim.platform()
            else:
                platform = platforms.real()
        except config_mod.FileUnanswered as exc:
            print(f"stoker: {exc}; exiting for a restart", file=sys.stderr)
            return EXIT_RETRY
        except (config_mod.ConfigError, ValueError) as exc:
            print(f"stoker: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG

        def reload() -> config_mod.Config:
            """SIGHUP: the file again, under the same flags; raises ConfigError when it is bad."""
            fresh = config_mod.load(path, overrides_from(args))
            return sim.configure(fresh, args.hint_listen is not None) if sim is not None else fresh

        return serve(cfg, platform, reload, path)


def serve(cfg: config_mod.Config, platform, reload, path: str | None = None) -> int:
    logs.configure(cfg.agent.log_format)
    from stoker.agent.runtime import Agent

    async def run_agent() -> int:
        return await Agent(cfg, platform, config_file=path).run(reload)

    try:
        status = asyncio.run(run_agent())
    except config_mod.FileUnanswered as exc:
        print(f"stoker: {exc}; exiting for a restart", file=sys.stderr)
        return EXIT_RETRY
    except config_mod.ConfigError as exc:
        print(f"stoker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # the listen address is taken or not ours
        logs.get("cli").error("cannot start", error=str(exc))
        return EXIT_CONFIG
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "check": cmd_check, "checkpoint": cmd_checkpoint, "replay": cmd_replay,
                "rules": cmd_rules, "cluster": cmd_cluster}
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
