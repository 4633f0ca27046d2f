"""The soak run's options: the command line over ``soak/config.toml``."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from demo.options import Names, add_service_options, at_least
from reliable_msg.service.settings import FallbackSettings

from .plan import MIN_ORDERS

#: The service configuration both instances run with.
CONFIG = Path(__file__).with_name("config.toml")
#: The demo services' database for the run: schemas orders, inventory, credit and wms.
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rmsg_soak"
#: Where each run's logs and report go, in a directory per run.
ARTIFACTS = Path(".artifacts/soak")
#: The short form: a few hundred messages, a few dozen TCC transactions, every kind of
#: fault once, one crash of each.
SHORT_MESSAGES, SHORT_TRANSACTIONS, SHORT_FAULTS, SHORT_CRASHES = 300, 40, 10, 1


@dataclass(frozen=True, slots=True)
class Options:
    messages: int  #: orders paid, one message each
    transactions: int  #: TCC transactions beside them (0: none, nor their faults)
    faults: int  #: environment faults (plus the crashes below)
    crashes: int  #: order service crashes, and as many per consumer group
    seed: int
    concurrency: int  #: payments in flight
    timeout: float  #: seconds to wait for quiescence once every order is paid
    run_dir: Path
    config: Path
    database_url: str
    service_database_url: str
    amqp_url: str
    redis_url: str
    shards: int
    poll_interval: float
    names: Names
    groups: tuple[str, ...]


def parse(argv: list[str] | None = None) -> Options:
    args = _parser().parse_args(argv)
    with Path(args.config).open("rb") as fh:
        config = tomllib.load(fh)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    options = Options(
        messages=args.messages,
        transactions=args.transactions,
        faults=args.faults,
        crashes=args.crashes,
        seed=args.seed,
        concurrency=args.concurrency,
        timeout=args.timeout,
        run_dir=Path(args.run_dir) if args.run_dir else ARTIFACTS / f"run-{stamp}",
        config=Path(args.config),
        database_url=args.database_url,
        service_database_url=args.service_database_url or config["database_url"],
        amqp_url=args.amqp_url or config["amqp_url"],
        redis_url=args.redis_url or config["redis_url"],
        shards=config["fallback"]["shards"],
        poll_interval=config["fallback"].get("poll_interval", FallbackSettings().poll_interval),
        names=Names.of_prefix(args.prefix) if args.prefix else Names.of_config(config),
        groups=tuple(config["groups"]),
    )
    if args.short:
        options = replace(
            options,
            messages=SHORT_MESSAGES,
            transactions=SHORT_TRANSACTIONS,
            faults=SHORT_FAULTS,
            crashes=SHORT_CRASHES,
        )
    return options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m soak",
        description="Run the demo topology under injected faults and prove that nothing was"
        " lost, applied twice or left stuck.",
    )
    p.add_argument(
        "--messages", type=at_least(MIN_ORDERS), default=5000, help="orders paid (default 5000)"
    )
    p.add_argument(
        "--transactions",
        type=at_least(0),
        default=500,
        help="TCC transactions run beside the payments, three participant branches each"
        " (default 500; 0: none, nor the faults aimed at their participants)",
    )
    p.add_argument(
        "--faults",
        type=at_least(0),
        default=24,
        help="environment faults: instance kills, RabbitMQ connections closed and app stopped,"
        " PostgreSQL backends terminated and server restarted, network stalls and cuts,"
        " TCC participant kills, and stalls and cuts of the network to one (default 24)",
    )
    p.add_argument(
        "--crashes",
        type=at_least(0),
        default=3,
        help="order service kills between commit and confirm, as many consumer kills"
        " between effect and ack per group, and as many TCC initiator kills between Try and"
        " commit (default 3)",
    )
    p.add_argument(
        "--short",
        action="store_true",
        help=f"the short form: {SHORT_MESSAGES} orders, {SHORT_TRANSACTIONS} TCC transactions,"
        f" {SHORT_FAULTS} faults (each kind once), {SHORT_CRASHES} crash of each process",
    )
    p.add_argument("--seed", type=int, default=11, help="chooses what fails when (default 11)")
    p.add_argument("--concurrency", type=at_least(1), default=16, help="payments in flight (16)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait, once every order is paid, for quiescence (default 300)",
    )
    p.add_argument("--run-dir", help=f"logs and report (default {ARTIFACTS}/run-<time>)")
    p.add_argument("--config", default=str(CONFIG), help="the service's TOML configuration")
    p.add_argument(
        "--database-url",
        default=os.environ.get("SOAK_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="the demo services' database (default $SOAK_DATABASE_URL or rmsg_soak)",
    )
    add_service_options(p)
    return p
