"""Fixtures over the real PostgreSQL, RabbitMQ and Redis of this machine.

Each test gets its own exchange and queue names (removed afterwards) and empty tables
in a database of the test session's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from reliable_msg.harness.rabbit_cluster import RabbitCluster
from reliable_msg.harness.redis_cluster import RedisCluster
from reliable_msg.sdk import consumer as consumer_sdk
from reliable_msg.sdk import producer as producer_sdk
from reliable_msg.service.api import create_app
from reliable_msg.service.migrate import migrate
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.settings import Settings, load_settings
from reliable_msg.transports.redis import delete_namespace
from tests.helpers import rabbit, redis_ctl, tables
from tests.helpers.checkback import ProducerEndpoint, serving_endpoint
from tests.helpers.servers import serving_app

#: The browser tests' fixtures (``browser``) and the Redis Cluster's (``redis_cluster``).
pytest_plugins = ["tests.helpers.browser", "tests.helpers.redis_cluster"]

ADMIN = "admin-token"
PRODUCER = "order-token"
OTHER_PRODUCER = "other-token"
GROUP_TOKENS = {"inventory": "inventory-token", "credit": "credit-token", "wms": "wms-token"}

# The tests configure the service themselves; settings a shell or make exported (env
# wins over a configuration file) must not leak into them or their child processes.
for _name in [n for n in os.environ if n.startswith("RMSG_") and not n.startswith("RMSG_TEST_")]:
    del os.environ[_name]

#: The PostgreSQL server the tests use; each test run makes a database of its own there.
SERVER_URL = os.environ.get("RMSG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")
DATABASE_URL = f"{SERVER_URL}/rmsg_test_{os.getpid()}"
#: Prefix of every RabbitMQ name and Redis namespace the tests make.
TEST_PREFIX = "rmsgtest."
AMQP_URL = os.environ.get("RMSG_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def _drop_database(url: str) -> None:
    admin = await asyncpg.connect(f"{SERVER_URL}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A freshly migrated database for this test run, dropped at its end."""

    async def fresh() -> None:
        await _drop_database(DATABASE_URL)
        await migrate(DATABASE_URL)

    asyncio.run(fresh())
    rabbit.remove_stale(TEST_PREFIX)
    yield DATABASE_URL
    asyncio.run(_drop_database(DATABASE_URL))


@contextlib.asynccontextmanager
async def emptied_db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, with the tables emptied first."""
    conn = await asyncpg.connect(database_url)
    try:
        # TCC's tables too: a test that counts transactions must not see another test's
        await tables.empty(
            conn,
            "rmsg_message",
            "rmsg_used_id",
            "rmsg_tcc_transaction",
            "rmsg_tcc_branch",
            "rmsg_tcc_event",
            "rmsg_tcc_used_gid",
        )
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, with the tables emptied first."""
    async with emptied_db(database_url) as conn:
        yield conn


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes of this run, clustered, for the tests of one module; killed
    and removed after it, even when a test failed (leftovers of a run killed earlier are
    removed first)."""
    with RabbitCluster(3) as cluster:
        yield cluster


@pytest.fixture
def cluster_redis_url(redis_cluster: RedisCluster) -> str:
    """The Redis the service degrades to in the RabbitMQ cluster tests: the session's
    Redis Cluster."""
    return redis_cluster.url


@pytest.fixture(autouse=True)
def _services_back() -> Iterator[None]:
    """Whatever a test did to RabbitMQ or Redis, they are running again after it."""
    yield
    redis_ctl.ensure_running()
    rabbit.ensure_running()


def unique_names() -> dict[str, str]:
    """Exchange and queue names of their own (a test's, or a module's shared service's)."""
    tag = f"{TEST_PREFIX}{os.getpid()}.{uuid.uuid4().hex[:8]}"
    return {"exchange": tag, "dead_letter_exchange": f"{tag}.dlx", "queue_prefix": f"{tag}."}


@pytest.fixture
def names() -> dict[str, str]:
    """Exchange and queue names of this test alone."""
    return unique_names()


@pytest.fixture
def namespace(names: dict[str, str]) -> str:
    """The Redis namespace of this test alone."""
    return names["exchange"]


def settings_for(database_url: str, names: dict[str, str], **overrides: Any) -> Settings:
    """The tests' settings on ``database_url`` with ``names``, then ``overrides`` (merged
    one level deep)."""
    data: dict[str, Any] = {
        "database_url": database_url,
        "amqp_url": AMQP_URL,
        "admin_token": ADMIN,
        "publish_timeout": 2.0,
        # Classic queues are far cheaper to declare and delete than quorum queues;
        # the wire-format test declares quorum ones.
        "queue_type": "classic",
        "max_payload_bytes": 1024,
        "max_request_bytes": 64 * 1024,
        "max_batch": 100,
        **names,
        "producers": {
            "order": {"check_url": "http://127.0.0.1:9/check", "token": PRODUCER},
            "other": {"check_url": "http://127.0.0.1:9/check", "token": OTHER_PRODUCER},
        },
        "groups": {
            "inventory": {"topics": ["order.paid"], "token": GROUP_TOKENS["inventory"]},
            "credit": {"topics": ["order.*"], "token": GROUP_TOKENS["credit"]},
            "wms": {"topics": ["order.paid"], "token": GROUP_TOKENS["wms"]},
        },
        "checkback": {"after": 0.2, "backoff_base": 0.1, "backoff_cap": 0.5, "timeout": 1.0},
        "redelivery": {"ack_timeout": 0.3, "backoff_cap": 2.0, "max_attempts": 4},
        "scanner": {"interval": 0.1},
        "fallback": {"namespace": names["exchange"], "shards": 8, "probe_interval": 0.2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return load_settings(None, **data)


@pytest.fixture
def make_settings(
    database_url: str, names: dict[str, str], redis_url: str
) -> Callable[..., Settings]:
    """``settings_for`` the test's database, names and Redis (``redis_url``: the
    machine's, or the Redis Cluster's for a test parametrized to run on both)."""
    return functools.partial(settings_for, database_url, names, redis_url=redis_url)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@contextlib.asynccontextmanager
async def started_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A started service instance without its scheduler (tests run passes themselves);
    stopped after, its RabbitMQ names and Redis namespace removed."""
    rt = await Runtime.create(settings, scanners=False)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()
        await rabbit.delete_topology(AMQP_URL, settings)
        await delete_namespace(settings.redis_url, settings.fallback.namespace)


@contextlib.asynccontextmanager
async def served_runtime(settings: Settings) -> AsyncIterator[tuple[Runtime, str]]:
    """:func:`started_runtime` with its API served on a real localhost port: both."""
    async with started_runtime(settings) as rt, serving_app(create_app(rt)) as url:
        yield rt, url


@pytest.fixture
async def runtime(settings: Settings, db: asyncpg.Connection) -> AsyncIterator[Runtime]:
    """A started service instance without its scheduler: tests run passes themselves."""
    async with started_runtime(settings) as rt:
        yield rt


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the test database, for the SDKs' own tables."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
async def sdk_db(db: asyncpg.Connection) -> asyncpg.Connection:
    """The test database with both SDKs' tables, a producer's ``sdk_orders`` and the
    consumers' ``sdk_effects``, all empty."""
    await producer_sdk.install(db)
    await consumer_sdk.install(db)
    await db.execute(
        """
        CREATE TABLE IF NOT EXISTS sdk_orders (id text PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS sdk_effects (group_name text, message_id text);
        """
    )
    await tables.empty(db, "sdk_orders", "sdk_effects", "rmsg_inbox", "rmsg_producer_marker")
    return db


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[ProducerEndpoint, int]]:
    """A producer's check-back endpoint on a free port: the endpoint and the port."""
    producer = ProducerEndpoint()
    async with serving_endpoint(producer.handle) as port:
        yield producer, port


@pytest.fixture
async def service_url(runtime: Runtime) -> AsyncIterator[str]:
    """The runtime's API served on a real localhost port."""
    async with serving_app(create_app(runtime)) as url:
        yield url


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://rmsg") as c:
        yield c


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(AMQP_URL)
    yield connection
    await connection.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
