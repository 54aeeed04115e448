"""Command-line entry: ``python -m concept_ext <command>``."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m concept_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build and dispatch information")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import build_info, format_info

        info = build_info()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
