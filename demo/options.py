"""The runner's options: the command line over ``demo/config.toml``."""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from reliable_msg.service.settings import FallbackSettings

from .tcc.plan import MIN_ORDERS as TCC_MIN_ORDERS

#: The service configuration the demo runs with.
CONFIG = Path(__file__).with_name("config.toml")
#: The demo services' database: schemas orders, inventory, credit and wms.
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rmsg_demo"
#: Where each run's logs, state and report go, in a directory per run.
ARTIFACTS = Path(".artifacts/demo")


@dataclass(frozen=True, slots=True)
class Names:
    """The service's names in RabbitMQ (``exchange``, ``dead_letter_exchange``,
    ``queue_prefix``) and in Redis (``fallback.namespace``)."""

    exchange: str
    dead_letter_exchange: str
    queue_prefix: str
    namespace: str

    @classmethod
    def of_prefix(cls, prefix: str) -> Names:
        return cls(prefix, f"{prefix}.dlx", f"{prefix}.", prefix)

    @classmethod
    def of_config(cls, config: dict[str, Any]) -> Names:
        return cls(
            config["exchange"],
            config["dead_letter_exchange"],
            config["queue_prefix"],
            config["fallback"]["namespace"],
        )

    def queue(self, group: str) -> str:
        return f"{self.queue_prefix}{group}"

    def queues(self, group: str) -> list[str]:
        """The group's queue and its dead-letter queue."""
        return [self.queue(group), f"{self.queue(group)}.dlq"]

    @property
    def probe_queue(self) -> str:
        """The queue of the service's recovery probe (``Settings.probe_queue``)."""
        return f"{self.queue_prefix}_probe"


@dataclass(frozen=True, slots=True)
class Options:
    orders: int  #: orders to create and pay
    tcc_orders: int  #: orders of the TCC part; 0: no TCC part
    seed: int  #: chooses which orders fail how
    timeout: float  #: seconds to wait for every message to be settled
    concurrency: int  #: HTTP requests in flight to the order service
    run_dir: Path
    config: Path  #: the service's TOML file
    database_url: str  #: the demo services' database
    service_database_url: str  #: the service's own database (dropped at each run)
    amqp_url: str
    redis_url: str
    shards: int  #: fallback shards per group
    poll_interval: float  #: how often the consumers re-read the degradation switch
    outage: bool  #: stop RabbitMQ mid-run and start it again
    names: Names
    groups: tuple[str, ...]  #: the consumer groups the config declares


def parse(argv: list[str] | None = None) -> Options:
    args = _parser().parse_args(argv)
    config_path = Path(args.config)
    with config_path.open("rb") as fh:
        config = tomllib.load(fh)
    names = Names.of_prefix(args.prefix) if args.prefix else Names.of_config(config)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Options(
        orders=args.orders,
        tcc_orders=args.tcc_orders,
        seed=args.seed,
        timeout=args.timeout,
        concurrency=args.concurrency,
        run_dir=Path(args.run_dir) if args.run_dir else ARTIFACTS / f"run-{stamp}",
        config=config_path,
        database_url=args.database_url,
        service_database_url=args.service_database_url or config["database_url"],
        amqp_url=args.amqp_url or config["amqp_url"],
        redis_url=args.redis_url or config["redis_url"],
        shards=config["fallback"]["shards"],
        poll_interval=config["fallback"].get("poll_interval", FallbackSettings().poll_interval),
        outage=args.outage,
        names=names,
        groups=tuple(config["groups"]),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m demo",
        description="Run the e-commerce demo of reliable-msg and prove the books balance.",
    )
    p.add_argument("--orders", type=at_least(5), default=100, help="orders to pay (default 100)")
    p.add_argument(
        "--tcc-orders",
        type=tcc_orders,
        default=12,
        help=f"orders of the TCC part, at least {TCC_MIN_ORDERS}; 0 skips it (default 12)",
    )
    p.add_argument("--seed", type=int, default=7, help="chooses the failing orders (default 7)")
    p.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait, once every order is paid, for every message to be done or"
        " cancelled (default 180)",
    )
    p.add_argument("--concurrency", type=at_least(1), default=8, help="requests in flight (8)")
    p.add_argument(
        "--no-outage",
        dest="outage",
        action="store_false",
        help="do not stop RabbitMQ (rabbitmqctl stop_app) while the middle third of the"
        " orders is paid",
    )
    p.add_argument(
        "--run-dir", help=f"logs, report and /metrics texts (default {ARTIFACTS}/run-<time>)"
    )
    p.add_argument("--config", default=str(CONFIG), help="the service's TOML configuration")
    p.add_argument(
        "--database-url",
        default=os.environ.get("DEMO_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the demo services' database (default $DEMO_DATABASE_URL or rmsg_demo)",
    )
    add_service_options(p)
    return p


def add_service_options(p: argparse.ArgumentParser) -> None:
    """Where the service runs, over what the config file says: a run of its own."""
    p.add_argument("--service-database-url", help="the service's database (default: config)")
    p.add_argument("--amqp-url", help="RabbitMQ (default: config)")
    p.add_argument("--redis-url", help="Redis (default: config)")
    p.add_argument(
        "--prefix",
        help="names of the run: exchange PREFIX, PREFIX.dlx, queues PREFIX.<group>,"
        " Redis namespace PREFIX (default: config)",
    )


def tcc_orders(text: str) -> int:
    value = int(text)
    if value != 0 and value < TCC_MIN_ORDERS:
        raise argparse.ArgumentTypeError(f"must be 0 or at least {TCC_MIN_ORDERS}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse
