"""``fedjax-sim``: run experiments from YAML configs with dotted overrides.

  fedjax-sim demo [overrides...]            FedAvg on Shakespeare by role (the defaults)
  fedjax-sim run CONFIG [overrides...]      e.g. rounds=50 client.optimizer.learning_rate=0.1

Bad input gives one line on stderr naming the file, key or value and exit code 2 (add
``--debug`` for the traceback); a diverged run exits with code 3.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_USAGE = 2
EXIT_DIVERGED = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedjax-sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="FedAvg on Shakespeare by role (the default config)")
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    demo.add_argument("--workdir", help="output folder (default: runs/<name>-<time>)")
    run = commands.add_parser("run", help="run a YAML config")
    run.add_argument("config", help="path to a YAML config, e.g. configs/shakespeare_fedavg.yaml")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    run.add_argument("--workdir", help="output folder (default: runs/<name>-<time>)")
    for sub in (demo, run):
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace a run of another config in --workdir (default: refuse)")
    return parser


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other bad input
        # argparse lists an empty `nargs="*"` positional among the missing ones; it is optional.
        raise _ArgumentError(message.replace("config, overrides", "config"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    parser.__class__ = _Parser
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse has no API
        for sub in action.choices.values():
            sub.__class__ = _Parser
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as error:
        print(f"fedjax-sim: error: {error} (see fedjax-sim --help)", file=sys.stderr)
        return EXIT_USAGE

    import fedjax_sim  # noqa: F401  (sets XLA flags before jax starts)
    from fedjax_sim.config import ConfigError, load_config
    from fedjax_sim.data.errors import DataError
    from fedjax_sim.simulation.loop import DivergenceError, run

    try:
        config = load_config(getattr(args, "config", None), args.overrides)
        run(config, workdir=args.workdir, overwrite=args.overwrite)
    except (ConfigError, DataError) as error:
        if debug:
            raise
        print(f"fedjax-sim: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as error:
        if debug:
            raise
        print(f"fedjax-sim: diverged: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("fedjax-sim: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
