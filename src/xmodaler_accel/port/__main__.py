"""Command line: `python -m xmodaler_accel.port config <X-modaler yaml> [--output ours.yaml]`.

    python -m xmodaler_accel.port config configs/image_caption/transformer/transformer.yaml \\
        --rl configs/image_caption/transformer/transformer_rl.yaml --output recipes/mine.yaml
    python -m xmodaler_accel.port config configs/image_caption/updown/updown_rl.yaml

Writes our YAML (to stdout without --output) and lists on stderr every X-modaler key that has no
counterpart, one line each. A config error prints `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .config import convert_config, render


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xmodaler_accel.port", description="Bring X-modaler work over."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="X-modaler YAML (with its _BASE_ chain) to ours")
    config.add_argument("xmodaler_yaml", type=Path, help="an X-modaler config file")
    config.add_argument(
        "--rl", type=Path, default=None, help="its RL config: the rl: and scst: sections"
    )
    config.add_argument("--output", type=Path, default=None, help="our YAML (default: stdout)")
    config.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="training images: write step counts instead of epochs (X-modaler's epoch = "
        "floor(images / TRAIN_BATCH_SIZE) steps)",
    )
    config.add_argument("--world-size", type=int, default=1, help="processes, with --train-images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        conversion = convert_config(
            args.xmodaler_yaml,
            rl=args.rl,
            train_images=args.train_images,
            world_size=args.world_size,
        )
        text = render(conversion)
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
    except (UserError, OSError) as err:
        message = " ".join(str(err).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    if conversion.unmapped:
        print(f"X-modaler keys not mapped ({len(conversion.unmapped)}):", file=sys.stderr)
        for key, why in conversion.unmapped.items():
            print(f"  {key}: {why}", file=sys.stderr)
    if args.output is not None:
        print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
