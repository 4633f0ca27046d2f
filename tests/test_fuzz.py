"""API fuzzing with schemathesis against the service's own OpenAPI schema, over real HTTP
to a real ``reliable-msg serve`` process: no 5xx, every response as the schema says.

Each role's operations are fuzzed with that role's token, so that generated requests get
past authentication and reach the use-cases.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliable_msg.service.settings import Settings
from tests.conftest import ADMIN, GROUP_TOKENS, PRODUCER, settings_for, unique_names
from tests.helpers.service import remove_traces, running, write_config
from tests.helpers.tcc_api import tcc_settings

#: Checks every answer must pass.
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "unsupported_method",
        "allow_header_conformance",
    ]
)

#: (role, token, filter options selecting that role's operations)
ROLES = [
    (
        "producer",
        PRODUCER,
        [
            "--include-path-regex",
            r"^/v1/(batch/(prepare|confirm|cancel)|messages(/\{id\}/(confirm|cancel))?)$",
            "--include-method",
            "POST",
        ],
    ),
    ("group", GROUP_TOKENS["inventory"], ["--include-path-regex", r"(/ack|/batch/ack)$"]),
    # --include-name-regex matches "METHOD /path": the method and the path together
    # (an --include-path-regex and an --include-method select either)
    (
        "tcc-producer",
        PRODUCER,
        [
            "--include-name-regex",
            r"^(POST /v1/tcc/transactions(/\{gid\}/(branches|commit|cancel))?"
            r"|GET /v1/tcc/transactions/\{gid\})$",
        ],
    ),
    (
        "tcc-admin",
        ADMIN,
        [
            "--include-name-regex",
            r"^(GET /v1/tcc/transactions(/\{gid\})?|POST /v1/tcc/transactions/\{gid\}/retry)$",
        ],
    ),
    (
        "admin",
        ADMIN,
        [
            "--include-path-regex",
            r"^/(v1/(stats|requeue|messages(/\{id\}(/requeue)?)?)|healthz|readyz|metrics)$",
            "--exclude-path-regex",
            r"/(confirm|cancel|ack)$",
        ],
    ),
]


@pytest.fixture(scope="module")
def settings(database_url: str) -> Settings:
    """The test settings with TCC participants, for the coordinator's routes."""
    return tcc_settings(functools.partial(settings_for, database_url, unique_names()))


@pytest.fixture(scope="module")
def service(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``serve`` process that every role's fuzzing runs against (started once, not per
    role: no role's run depends on a fresh one, the database is the session's)."""
    logs = tmp_path_factory.mktemp("fuzz")
    config = write_config(settings, logs / "fuzz.toml")
    try:
        with running(config, logs) as [instance]:
            yield instance.url
    finally:
        asyncio.run(remove_traces(settings))


@pytest.mark.parametrize(("role", "token", "selection"), ROLES, ids=[r[0] for r in ROLES])
def test_fuzzing_finds_no_server_error_and_no_schema_violation(
    role: str, token: str, selection: list[str], service: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "st"),
            "run",
            f"{service}/openapi.json",
            "--header",
            f"Authorization: Bearer {token}",
            "--checks",
            CHECKS,
            "--max-examples",
            "25",
            "--seed",
            "20261127",
            "--no-color",
            *selection,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # schemathesis keeps a cache folder where it runs
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert "Selected:" in result.stdout and "Tested:" in result.stdout, report
    assert result.returncode == 0, report
