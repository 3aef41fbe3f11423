"""The `dla` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dla", description="Dynamic Linear Attention")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="segment a piecewise-stationary stream and check the readout against the reference")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dla.demo import main as demo

        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
