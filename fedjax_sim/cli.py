"""``fedjax-sim``: run experiments from YAML configs with dotted overrides.

  fedjax-sim demo [overrides...]            FedAvg on Shakespeare by role (the defaults)
  fedjax-sim run CONFIG [overrides...]      e.g. rounds=50 client.optimizer.learning_rate=0.1
  fedjax-sim sweep CONFIG [--grid key=v1,v2 ...] [--seeds N] [overrides...]
                                            many configurations in one compiled program
  fedjax-sim data stats CONFIG [overrides...] [--out DIR]     clients, sizes, labels, plots
  fedjax-sim data convert CONFIG [overrides...] [--out DIR]   build the memory-mapped cache
  fedjax-sim analytics CONFIG [overrides...]   a private statistic, e.g.
                                               configs/analytics/shakespeare_heavy_hitters.yaml
  fedjax-sim run CONFIG --coordinator HOST:PORT --num-processes N --process-id I
                                            one of N processes (jax.distributed)
  fedjax-sim launch -n N [--port P] -- run CONFIG [...]   N processes on this machine

Bad input gives one line on stderr naming the file, key or value and exit code 2 (add
``--debug`` for the traceback); a diverged run exits with code 3.
"""

from __future__ import annotations

import argparse
import os
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
        sub.add_argument("--coordinator", metavar="HOST:PORT",
                         help="multi-process run: process 0's address (or "
                              "FEDJAX_SIM_COORDINATOR)")
        sub.add_argument("--num-processes", type=int, metavar="N",
                         help="multi-process run: processes in all (or "
                              "FEDJAX_SIM_NUM_PROCESSES)")
        sub.add_argument("--process-id", type=int, metavar="I",
                         help="multi-process run: this process, 0 .. N-1 (or "
                              "FEDJAX_SIM_PROCESS_ID)")
        sub.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                         help="multi-process run: end every process with an error when one "
                              "is silent this long (default 30)")
    launch = commands.add_parser(
        "launch", help="run a command as N connected processes of this machine")
    launch.add_argument("-n", "--num-processes", type=int, required=True, metavar="N")
    launch.add_argument("--port", type=int, default=12355, help="the coordinator's port")
    launch.add_argument("command_args", nargs=argparse.REMAINDER, metavar="-- run CONFIG ...",
                        help="the fedjax-sim command every process runs")
    sweep = commands.add_parser(
        "sweep", help="train many configurations of a config in one compiled program")
    sweep.add_argument("config", help="a sweep config (a run config with a sweep: section), "
                                      "e.g. configs/sweeps/fashion_mnist_fedavg_lr.yaml")
    sweep.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="sweep KEY over the values (repeatable; adds to sweep.grid)")
    sweep.add_argument("--seeds", type=int, help="seeds per configuration (replaces "
                                                  "sweep.seeds)")
    sweep.add_argument("--workdir", help="output folder (default: runs/<name>-sweep-<time>)")
    sweep.add_argument("--overwrite", action="store_true",
                       help="replace another sweep in --workdir (default: refuse)")
    sweep.add_argument("--debug", action="store_true", help="show tracebacks")
    data = commands.add_parser("data", help="inspect or convert a config's dataset")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    stats = data_commands.add_parser(
        "stats", help="print clients, examples per client and classes; write PNG plots")
    convert = data_commands.add_parser(
        "convert", help="convert the dataset once into a memory-mapped cache")
    for sub, out_help in ((stats, "folder for the plots (default: runs/data_stats-<dataset>)"),
                          (convert, "cache folder (default: the loader's, under the data dir)")):
        sub.add_argument("config", help="path to a YAML config (its dataset section is used)")
        sub.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        sub.add_argument("--out", help=out_help)
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    stats.add_argument("--sample", type=int, default=30,
                       help="clients in the label-distribution heatmap (default 30)")
    _add_analytics_parser(commands)
    return parser


def _add_analytics_parser(commands) -> None:
    """``fedjax-sim analytics CONFIG [overrides...]`` (`fedjax_sim.analytics.runner`)."""
    analytics = commands.add_parser(
        "analytics", help="a private statistic of a federated dataset (heavy hitters, "
                          "histograms, quantiles, means)")
    analytics.add_argument("config", help="path to an analytics YAML config, e.g. "
                                          "configs/analytics/shakespeare_heavy_hitters.yaml")
    analytics.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    analytics.add_argument("--workdir", help="output folder (default: runs/<name>-<time>)")
    analytics.add_argument("--overwrite", action="store_true",
                           help="replace a query of another config in --workdir")
    analytics.add_argument("--debug", action="store_true", help="show tracebacks")


def _analytics_command(args) -> None:
    from fedjax_sim.analytics.runner import run_analytics

    run_analytics(args.config, overrides=args.overrides, workdir=args.workdir,
                  overwrite=args.overwrite)


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every other bad input
        # argparse lists an empty `nargs="*"` positional among the missing ones; it is optional.
        raise _ArgumentError(message.replace("config, overrides", "config"))


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Makes ``parser`` and its sub-command parsers, at any depth, raise `_ArgumentError`."""
    parser.__class__ = _Parser
    if parser._subparsers is None:  # noqa: SLF001 - argparse has no API
        return
    for action in parser._subparsers._group_actions:  # noqa: SLF001
        for sub in action.choices.values():
            _one_line_errors(sub)


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that ``key=value`` overrides may also follow the flags
    (``run CONFIG --workdir DIR rounds=3``): argparse takes a ``nargs="*"`` positional only in
    one piece, and called the later overrides unrecognized arguments."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    stray = [arg for arg in extra
             if not takes_overrides or arg.startswith("-") or "=" not in arg]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    _one_line_errors(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = _parse(parser, argv)
    except _ArgumentError as error:
        print(f"fedjax-sim: error: {error} (see fedjax-sim --help)", file=sys.stderr)
        return EXIT_USAGE

    if args.command == "launch":
        return _launch_command(args)

    if args.command not in ("run", "demo") and os.environ.get("FEDJAX_SIM_COORDINATOR"):
        print(f"fedjax-sim: error: FEDJAX_SIM_COORDINATOR is set, but {args.command!r} runs in "
              "one process (multi-process runs: 'run' and 'demo'); unset it", file=sys.stderr)
        return EXIT_USAGE

    import fedjax_sim  # noqa: F401  (sets XLA flags before jax starts)
    from fedjax_sim.compilation_cache import enable_compilation_cache
    from fedjax_sim.config import ConfigError, demo_config, load_config
    from fedjax_sim.data.errors import DataError
    from fedjax_sim.simulation.loop import DivergenceError, run

    for flag in ("workdir", "out"):  # a file where a folder goes: before any work
        if getattr(args, flag, None):
            from fedjax_sim.config import ConfigError, check_folder

            try:
                check_folder(getattr(args, flag), f"--{flag}")
            except ConfigError as error:
                print(f"fedjax-sim: error: {error}", file=sys.stderr)
                return EXIT_USAGE
    if args.command == "data" and args.data_command == "stats" and args.sample < 1:
        print(f"fedjax-sim: error: --sample: expected an integer >= 1, got {args.sample} "
              "(clients in the label-distribution heatmap)", file=sys.stderr)
        return EXIT_USAGE
    if args.command != "data":
        enable_compilation_cache()  # a repeated run reads its programs instead of compiling
    try:
        if args.command == "sweep":
            from fedjax_sim.sweeps import sweep

            sweep(args.config, args.overrides, grid=args.grid, seeds=args.seeds,
                  workdir=args.workdir, overwrite=args.overwrite)
            return 0
        if args.command == "analytics":
            _analytics_command(args)
            return 0
        if args.command in ("run", "demo"):
            _initialize_processes(args)
        if args.command == "demo":
            config = demo_config(args.overrides)
        else:
            config = load_config(getattr(args, "config", None), args.overrides)
        if args.command == "data":
            _data_command(args, config)
        else:
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
    except OSError as error:  # a folder that cannot be written (read-only, full, no such)
        if debug:
            raise
        where = f": {error.filename!r}" if error.filename else ""
        print(f"fedjax-sim: error: {error.strerror or error}{where}; check that the path can be "
              "written (--workdir, --out and dataset.data_dir choose where files go)",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedjax-sim: interrupted", file=sys.stderr)
        return 130
    return 0


def _initialize_processes(args) -> None:
    """``jax.distributed`` from the flags or the environment (nothing for one process)."""
    from fedjax_sim.config import ConfigError
    from fedjax_sim.simulation.distributed import initialize

    try:
        initialize(args.coordinator, args.num_processes, args.process_id,
                   heartbeat_timeout=args.heartbeat_timeout)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _launch_command(args) -> int:
    from fedjax_sim.simulation.distributed import launch_local

    command = list(args.command_args)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command or command[0] not in ("run", "demo"):
        print("fedjax-sim: error: launch runs 'run CONFIG ...' or 'demo ...' in every process, "
              f"got {' '.join(command) or 'nothing'!r} (e.g. fedjax-sim launch -n 2 -- run "
              "configs/fashion_mnist_fedavg.yaml)", file=sys.stderr)
        return EXIT_USAGE
    if args.num_processes < 1:
        print(f"fedjax-sim: error: --num-processes {args.num_processes}: expected >= 1",
              file=sys.stderr)
        return EXIT_USAGE
    return launch_local(command, args.num_processes, args.port)


def _data_command(args, config) -> None:
    """``fedjax-sim data stats|convert``: the dataset of ``config``."""
    import time
    from pathlib import Path

    import numpy as np

    from fedjax_sim.data import stats
    from fedjax_sim.datasets import cache
    from fedjax_sim.simulation.loop import build_dataset, build_dataset_cache

    if args.data_command == "convert":
        start = time.perf_counter()
        path = build_dataset_cache(config, args.out)
        summary = cache.open_cache(path).train.summary()
        print(f"fedjax-sim: {config.dataset.name}: {summary['clients']:,} clients, "
              f"{summary['examples']:,} train examples -> {path} "
              f"({time.perf_counter() - start:.1f} s)")
        return

    dataset = build_dataset(config)
    info = dataset.info
    out = Path(args.out or Path("runs") / f"data_stats-{config.dataset.name}")
    out.mkdir(parents=True, exist_ok=True)
    train = dataset.train
    print(f"dataset {config.dataset.name}: {train.num_clients:,} clients")
    splits = [("train", train), ("test", dataset.test)]
    for split, data in splits:
        if data is None:
            continue
        s = stats.size_summary(data.client_sizes)
        print(f"  {split}: {s['examples']:,} examples; per client min {s['min']:,} / median "
              f"{s['median']:g} / mean {s['mean']:.1f} / max {s['max']:,}")
    if dataset.central_test is not None:
        central = len(next(iter(dataset.central_test.values())))
        print(f"  central test: {central:,} examples")
    num_classes = int(info["num_classes"])
    pad = info.get("pad_label")
    totals = stats.class_counts(train.arrays["y"], num_classes, pad)
    pad_note = f", pad label {pad} not counted" if pad is not None else ""
    print(f"  classes: {num_classes:,} ({int(np.count_nonzero(totals)):,} occur in the train "
          f"labels{pad_note})")
    sizes_png = stats.plot_client_sizes(
        train.client_sizes, out / "client_sizes.png",
        title=f"{config.dataset.name}: {train.num_clients:,} clients")
    sample = stats.sample_clients(train.num_clients, args.sample, seed=config.seed)
    counts = stats.client_label_counts(train, sample, num_classes, pad)
    labels_png = stats.plot_label_distribution(
        counts, train.client_ids[sample], out / "label_distribution.png",
        title=f"{config.dataset.name}: labels of {sample.size} sampled clients")
    print(f"  wrote {sizes_png} and {labels_png}")


if __name__ == "__main__":
    sys.exit(main())
