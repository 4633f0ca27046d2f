"""``python -m downstream_demo inventory|credit|wms``: run one consumer group."""

from __future__ import annotations

import argparse
import asyncio
import logging

from .config import Config
from .groups import GROUPS
from .worker import run


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m downstream_demo", description=__doc__)
    parser.add_argument("group", choices=sorted(GROUPS))
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(run(GROUPS[args.group], Config.from_env(args.group)))


if __name__ == "__main__":
    main()
