"""``python -m bench [--smoke] [--out DIR] [--database-url URL]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

from .report import write_all
from .run import FULL, SMOKE, run_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (< 60 s): checks the benchmark runs, measures nothing useful")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks, or build/bench-smoke with --smoke)")
    parser.add_argument("--database-url", default=None,
                        help="a superuser URL of a server to use instead of a throw-away embedded one (databases are created and dropped)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    # The system scope logs every use at WARNING; the loader's one line per load is expected here.
    logging.basicConfig(level=logging.ERROR)
    console = Console(stderr=True)
    sizes = SMOKE if args.smoke else FULL
    out = args.out or (Path("build/bench-smoke") if args.smoke else Path("docs/benchmarks"))
    results = run_all(sizes, database_url=args.database_url, console=console, progress=not args.no_progress)
    paths = write_all(results, out)
    console.print(f"[bold]bench[/] done in {results.seconds} s: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
