"""``python -m soak [--messages N] [--short] ...``: the fault-injection soak run
(``--help`` for options).

Exit status: 0 nothing lost, nothing applied twice, nothing stuck; 1 not so; 2 no
quiescence in time; 3 the run could not start; 130 / 143 interrupted by SIGINT /
SIGTERM. In every case each process it started is stopped, and every dependency a fault
took away (RabbitMQ's application, the PostgreSQL server) is running again before it
exits.
"""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console

from demo.errors import DemoError

from .options import parse
from .runner import Run


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    # Wide enough for the faults table in a log file or CI, where there is no terminal.
    console = Console(record=True, width=None if sys.stdout.isatty() else 120)
    try:
        return asyncio.run(Run(options, console).main())
    except DemoError as exc:
        console.print(f"[bold red]the soak run could not run:[/] {exc}", highlight=False)
        return 3


if __name__ == "__main__":
    sys.exit(main())
