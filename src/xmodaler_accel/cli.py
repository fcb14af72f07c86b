"""The recipes' command line. Light on purpose: it imports neither torch nor the models, so a
recipe that parses first answers `--help` and a mistyped flag at once."""

from __future__ import annotations

import argparse


class _IntermixedParser(argparse.ArgumentParser):
    """Flags may come after the overrides (`... train.max_steps=9 --resume`)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        return self.parse_intermixed_args(args, namespace)


def default_argument_parser(epilog: str | None = None) -> argparse.ArgumentParser:
    """`--config`, `--resume`, `--overwrite`, `--eval-only`, `--print-config`, the options of
    `launch()` and `key=value` overrides."""
    parser = _IntermixedParser(epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "--config-file", dest="config", required=True, help="YAML")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir (newest checkpoint)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the run in output_dir and start again"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate model.weights and exit")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (what the run would write to config.yaml) and exit",
    )
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes to start on this machine (launch)"
    )
    parser.add_argument("--num-machines", type=int, default=1, help="machines in the job (launch)")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank (launch)")
    parser.add_argument(
        "--dist-url", default="auto", help="tcp://host:port of machine 0; auto on one machine"
    )
    parser.add_argument("opts", nargs="*", help="config overrides: train.max_steps=100")
    return parser
