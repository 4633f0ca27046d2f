"""The ``reliable-msg`` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import click

from reliable_msg import logs
from reliable_msg.errors import ReliableMsgError
from reliable_msg.service.settings import Settings, load_settings
from reliable_msg.service.tcc.states import TxStatus
from reliable_msg.states import MessageStatus

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger("reliable_msg")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "-c",
    envvar="RMSG_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML configuration file (also $RMSG_CONFIG).",
)
@click.option(
    "--log-level",
    envvar="RMSG_LOG_LEVEL",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-format",
    envvar="RMSG_LOG_FORMAT",
    default="text",
    type=click.Choice(["text", "json"], case_sensitive=False),
    help="Log lines as readable text or as one JSON object each (also $RMSG_LOG_FORMAT).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None, log_level: str, log_format: str) -> None:
    """reliable-msg: all-or-nothing delivery between services over RabbitMQ."""
    logs.configure(log_level, "json" if log_format.lower() == "json" else "text")
    ctx.obj = config


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load_settings(ctx.obj, **overrides)
    except ReliableMsgError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"reliable-msg: {message}", err=True)
    sys.exit(code)


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and print what it declares."""
    settings = _settings(ctx)
    missing = [f"producer {n}" for n, p in settings.producers.items() if p.token is None] + [
        f"group {n}" for n, g in settings.groups.items() if g.token is None
    ]
    click.echo(f"producers: {', '.join(settings.producers) or '(none)'}")
    for name, group in settings.groups.items():
        click.echo(f"group {name}: queue {settings.queue_name(name)} <- {', '.join(group.topics)}")
    for name, participant in settings.participants.items():
        timeout = settings.call_timeout(name)
        click.echo(f"participant {name}: {participant.url} (calls time out after {timeout:g} s)")
    if settings.admin_token is None:
        click.echo("warning: no admin token: admin calls are refused", err=True)
    if missing:
        click.echo(f"warning: no token for {', '.join(missing)}: it cannot call the API", err=True)
    click.echo("configuration ok")


@main.command()
@click.option("--no-create-db", is_flag=True, help="Fail instead of creating the database.")
@click.pass_context
def migrate(ctx: click.Context, no_create_db: bool) -> None:
    """Apply the database migrations not applied yet (safe to run concurrently)."""
    from reliable_msg.service.migrate import migrate as run

    settings = _settings(ctx)
    try:
        applied = asyncio.run(run(settings.database_url, create_database=not no_create_db))
    except ReliableMsgError as exc:
        _fail(str(exc), code=1)
    click.echo(f"applied {len(applied)} migration(s)" if applied else "schema up to date")


@main.command()
@click.option("--host", help="Address to listen on (default from config).")
@click.option("--port", type=int, help="Port to listen on (default from config).")
@click.option("--no-scanners", is_flag=True, help="Serve the API only.")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None, no_scanners: bool) -> None:
    """Run the HTTP API and the scanners."""
    import uvloop

    settings = _settings(ctx)
    try:
        # None: as the configuration says (scanner.enabled); --no-scanners overrides it.
        uvloop.run(_serve(settings, host, port, scanners=False if no_scanners else None))
    except ReliableMsgError as exc:
        _fail(str(exc), code=1)


#: Seconds ``serve`` waits for PostgreSQL at start-up (a server restarting, or started
#: together with the service) before it gives up with an error.
STARTUP_WAIT = 60.0


async def _serve(
    settings: Settings, host: str | None, port: int | None, scanners: bool | None
) -> None:
    import uvicorn

    from reliable_msg.service.api import create_app
    from reliable_msg.service.runtime import Runtime

    runtime = await Runtime.create(settings, scanners=scanners, wait_for_store=STARTUP_WAIT)
    config = uvicorn.Config(
        create_app(runtime, manage=True),
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_level=logging.getLogger().level,
        # JSON: uvicorn's records go through the root logger's JSON handler too.
        log_config=None if logs.json_enabled() else uvicorn.config.LOGGING_CONFIG,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    await uvicorn.Server(config).serve()


# -- operators' commands: the database and the broker directly, no service needed -------


def _admin(
    ctx: click.Context, command: Callable[[Settings, Console], Coroutine[Any, Any, None]]
) -> None:
    from rich.console import Console

    settings = _settings(ctx)
    try:
        asyncio.run(command(settings, Console(soft_wrap=True)))
    except ReliableMsgError as exc:
        _fail(exc.message, code=1)


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """Counts per status, topic and group; broker mode, fallback depth, switch history."""
    from reliable_msg.tools import admin

    _admin(ctx, admin.status)


@main.group()
def messages() -> None:
    """List messages, or show one with its deliveries and history."""


@messages.command("list")
@click.option("--status", type=click.Choice([s.value for s in MessageStatus]))
@click.option("--topic", help="Only this topic.")
@click.option("--group", help="Only messages delivered to this consumer group.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def list_messages(
    ctx: click.Context, status: str | None, topic: str | None, group: str | None, limit: int
) -> None:
    """Messages, oldest first."""
    from reliable_msg.tools import admin

    state = MessageStatus(status) if status else None
    _admin(
        ctx,
        lambda s, c: admin.list_messages(s, c, status=state, topic=topic, group=group, limit=limit),
    )


@messages.command("show")
@click.argument("id")
@click.pass_context
def show_message(ctx: click.Context, id: str) -> None:
    """One message: payload, headers, deliveries and history of transitions."""
    from reliable_msg.tools import admin

    _admin(ctx, lambda s, c: admin.show(s, c, id))


@main.command()
@click.argument("id", required=False)
@click.option("--group", help="Requeue every dead message of this consumer group.")
@click.option("--topic", help="With --group: only the dead messages of this topic.")
@click.option("--yes", is_flag=True, help="Requeue a group's messages without asking.")
@click.pass_context
def requeue(
    ctx: click.Context, id: str | None, group: str | None, topic: str | None, yes: bool
) -> None:
    """Bring dead messages back: one by ID, or all of a --group."""
    from reliable_msg.tools import admin

    if (id is None) == (group is None):
        _fail("give either a message ID or --group (with --topic to narrow it)")
    if id is not None:
        if topic is not None:
            _fail("--topic goes with --group, not with a message ID")
        _admin(ctx, lambda s, c: admin.requeue_one(s, c, id))
        return
    assert group is not None

    def confirm(dead: int) -> bool:
        prompt = f"group {group} has {dead} dead deliveries; requeue its dead messages"
        return yes or click.confirm(prompt + (f" of topic {topic}" if topic else "") + "?")

    _admin(ctx, lambda s, c: admin.requeue_group(s, c, group=group, topic=topic, confirm=confirm))


@main.command()
@click.option("--older-than", required=True, help="Age such as 7d, 12h, 30m or 90s.")
@click.pass_context
def purge(ctx: click.Context, older_than: str) -> None:
    """Delete done and cancelled messages finished longer ago than --older-than."""
    from reliable_msg.tools import admin

    try:
        seconds = admin.parse_age(older_than)
    except ValueError as exc:
        _fail(str(exc))
    _admin(ctx, lambda s, c: admin.purge(s, c, seconds))


@main.group()
def tcc() -> None:
    """TCC global transactions: list them, show one, retry one now."""


@tcc.command("list")
@click.option("--status", type=click.Choice([s.value for s in TxStatus]))
@click.option("--stalled", is_flag=True, help="Only the stalled ones.")
@click.option("--participant", help="Only those with a branch at this participant.")
@click.option("--initiator", help="Only those this producer began.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 500))
@click.pass_context
def list_tcc(
    ctx: click.Context,
    status: str | None,
    stalled: bool,
    participant: str | None,
    initiator: str | None,
    limit: int,
) -> None:
    """Global transactions, newest first."""
    from reliable_msg.tools import tcc_admin

    state = TxStatus(status) if status else None
    _admin(
        ctx,
        lambda s, c: tcc_admin.list_transactions(
            s,
            c,
            status=state,
            stalled=True if stalled else None,
            participant=participant,
            initiator=initiator,
            limit=limit,
        ),
    )


@tcc.command("show")
@click.argument("gid")
@click.pass_context
def show_tcc(ctx: click.Context, gid: str) -> None:
    """One global transaction: its branches (attempts, next try, last error) and its
    event log."""
    from reliable_msg.tools import tcc_admin

    _admin(ctx, lambda s, c: tcc_admin.show(s, c, gid))


@tcc.command("retry")
@click.argument("gid")
@click.pass_context
def retry_tcc(ctx: click.Context, gid: str) -> None:
    """Call a confirming or cancelling transaction's branches again now, without waiting
    for their backoff."""
    from reliable_msg.tools import tcc_admin

    _admin(ctx, lambda s, c: tcc_admin.retry(s, c, gid))


#: The bench's counts: none of them can be 0 (a run of nothing hangs or divides by it).
COUNT = click.IntRange(min=1)


@main.command()
@click.option(
    "--messages",
    default=5000,
    type=COUNT,
    show_default=True,
    help="Messages per single-API run.",
)
@click.option("--batch-messages", default=20000, type=COUNT, show_default=True)
@click.option(
    "--batch", default=100, type=COUNT, show_default=True, help="Messages per batch call."
)
@click.option(
    "--concurrency", default=32, type=COUNT, show_default=True, help="Producer calls in flight."
)
@click.option(
    "--tcc-transactions",
    default=3000,
    type=COUNT,
    show_default=True,
    help="TCC global transactions (3 branches each).",
)
@click.option(
    "--tcc-concurrency",
    default=32,
    type=COUNT,
    show_default=True,
    help="TCC transactions in flight.",
)
@click.option(
    "--floor-requests",
    default=20_000,
    show_default=True,
    help="Bare HTTP round trips of the floor F (after a warm-up of a tenth as many).",
)
@click.option(
    "--big-rows",
    default=5_000_000,
    show_default=True,
    help="Finished messages in the large scanner table (built once, then reused).",
)
@click.option(
    "--postgres-url",
    default="postgresql://postgres@127.0.0.1:5432",
    show_default=True,
    help="Server for the benchmark's own databases (rmsg_bench*).",
)
@click.option(
    "--parts",
    default="floor,ceilings,scanner,paths,tcc",
    show_default=True,
    help="Comma-separated parts to run; a partial run judges the targets it has figures for.",
)
@click.option(
    "--paths",
    default="single,batch,latency,degraded",
    show_default=True,
    help="Comma-separated runs of the paths part (latency needs single).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=".artifacts/bench/results.json",
    show_default=True,
)
def bench(
    messages: int,
    batch_messages: int,
    batch: int,
    concurrency: int,
    tcc_transactions: int,
    tcc_concurrency: int,
    floor_requests: int,
    big_rows: int,
    postgres_url: str,
    parts: str,
    paths: str,
    json_path: str,
) -> None:
    """Measure the full path against the PostgreSQL and RabbitMQ ceilings (see BENCHMARKS.md)."""
    from pathlib import Path

    import uvloop
    from rich.console import Console

    from reliable_msg.tools.bench.run import PARTS, PATHS, Options, run, write_json

    chosen_parts, chosen_paths = _names(parts), _names(paths)
    for option, chosen, known in (
        ("--parts", chosen_parts, PARTS),
        ("--paths", chosen_paths, PATHS),
    ):
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            _fail(f"{option}: {', '.join(unknown) or 'none given'}; choose from {', '.join(known)}")
    if "latency" in chosen_paths and "single" not in chosen_paths:
        _fail("--paths: latency needs single (its runs go at half the single run's peak)")
    if floor_requests < 1:
        _fail(f"--floor-requests: {floor_requests}; at least 1")
    options = Options(
        postgres_url=postgres_url.rstrip("/"),
        messages=messages,
        batch_messages=batch_messages,
        batch=batch,
        concurrency=concurrency,
        tcc_transactions=tcc_transactions,
        tcc_concurrency=tcc_concurrency,
        floor_requests=floor_requests,
        big_rows=big_rows,
        parts=chosen_parts,
        paths=chosen_paths,
    )
    results = uvloop.run(run(options, Console()))
    write_json(results, Path(json_path))
    click.echo(f"figures written to {json_path}")


def _names(text: str) -> tuple[str, ...]:
    """The names of a comma-separated option."""
    return tuple(p.strip() for p in text.split(",") if p.strip())
