"""`stoker run | --version`: flags over the TOML configuration, clear errors, exit codes.

Exit status 2 means the agent could not start as asked (a configuration
error); systemd's RestartPreventExitStatus=2 keeps such a unit from looping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile

from stoker import __version__, config as config_mod, logs

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stoker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"stoker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file")
    run.add_argument("--listen", metavar="HOST:PORT",
                     help=f"address to serve /metrics on (default 0.0.0.0:{config_mod.DEFAULT_PORT})")
    run.add_argument("--interval", type=float, metavar="SECONDS", help="sampling interval (default 1)")
    run.add_argument("--sysfs-root", metavar="DIR", help="where sysfs is mounted (default /sys)")
    run.add_argument("--procfs-root", metavar="DIR", help="where procfs is mounted (default /proc)")
    run.add_argument("--simulate", nargs="?", const="cycle", metavar="SCENARIO",
                     help="run on the built-in simulated XE9680 node (default scenario: cycle)")
    run.add_argument("--log-format", choices=["auto", "json", "console"], help="log format (default auto)")
    return parser


def overrides_from(args: argparse.Namespace) -> dict:
    agent = {key: value for key, value in (
        ("listen", args.listen), ("interval", args.interval), ("sysfs_root", args.sysfs_root),
        ("procfs_root", args.procfs_root), ("log_format", args.log_format)) if value is not None}
    return {"agent": agent} if agent else {}


def simulated(cfg: config_mod.Config, scenario: str, stack: contextlib.ExitStack):
    """The simulated node's platform, its kernel trees written under a fresh temporary
    directory; returns the platform and the configuration pointed at them."""
    from stoker.sim.scenarios import get as get_scenario
    from stoker.sim.simulation import Simulation

    get_scenario(scenario)  # an unknown name is a configuration error, before anything is written
    root = stack.enter_context(tempfile.TemporaryDirectory(prefix="stoker-sim-"))
    sim = Simulation(scenario, root, cfg.sim.rdma_ports)
    return sim.platform(), sim.configure(cfg)


def cmd_run(args: argparse.Namespace) -> int:
    from stoker.agent import platform as platforms
    with contextlib.ExitStack() as stack:
        try:
            cfg = config_mod.load(args.config, overrides_from(args))
            if args.simulate is not None:
                platform, cfg = simulated(cfg, args.simulate, stack)
            else:
                platform = platforms.real()
        except (config_mod.ConfigError, ValueError) as exc:
            print(f"stoker: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        return serve(cfg, platform)


def serve(cfg: config_mod.Config, platform) -> int:
    logs.configure(cfg.agent.log_format)
    from stoker.agent.runtime import Agent

    async def main() -> None:
        agent = Agent(cfg, platform)
        await agent.run()

    try:
        asyncio.run(main())
    except config_mod.ConfigError as exc:
        print(f"stoker: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # the listen address is taken or not ours
        logs.get("cli").error("cannot start", error=str(exc))
        return EXIT_CONFIG
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
