"""The ``reliable-msg`` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, NoReturn

import click

from .errors import ReliableMsgError
from .settings import Settings, load_settings

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
@click.pass_context
def main(ctx: click.Context, config: str | None, log_level: str) -> None:
    """reliable-msg: all-or-nothing delivery between services over RabbitMQ."""
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
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
    from .migrate import migrate as run

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
        uvloop.run(_serve(settings, host, port, scanners=not no_scanners))
    except ReliableMsgError as exc:
        _fail(str(exc), code=1)


async def _serve(settings: Settings, host: str | None, port: int | None, scanners: bool) -> None:
    import uvicorn

    from .api import create_app
    from .runtime import Runtime

    runtime = await Runtime.create(settings, scanners=scanners)
    config = uvicorn.Config(
        create_app(runtime, manage=True),
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_level=logging.getLogger().level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    await uvicorn.Server(config).serve()
