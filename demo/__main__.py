"""``python -m demo [--orders N] ...``: run the e-commerce demo (``--help`` for options).

Exit status: 0 the books balance and every injected failure healed as planned; 1 they
do not; 2 the messages did not settle in time; 3 the demo could not run; 130 / 143
interrupted by SIGINT / SIGTERM. In all cases every process it started is stopped, and
RabbitMQ, if the outage phase stopped it, is started again and answers before it exits.
"""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console

from .errors import DemoError
from .options import parse
from .runner import Run


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    console = Console(record=True)
    try:
        return asyncio.run(Run(options, console).main())
    except DemoError as exc:
        console.print(f"[bold red]the demo could not run:[/] {exc}", highlight=False)
        return 3


if __name__ == "__main__":
    sys.exit(main())
