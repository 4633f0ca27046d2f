"""Every error code reliable-msg raises or answers is in ``errors.CODES`` with the error
that raises it, so a batch item's code maps to the same typed error, and the same
transient-or-final decision, as a single call's HTTP status."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reliable_msg import errors
from reliable_msg.errors import CODES, ReliableMsgError, status_of
from reliable_msg.sdk.client import TRANSIENT, _items

PACKAGE = Path(errors.__file__).parent
CLASSES: dict[str, type[ReliableMsgError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, ReliableMsgError)
}


def _raised() -> list[tuple[str, str, str]]:
    """(where, error class, code) of every ``SomeError(..., code="...")`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            for keyword in node.keywords:
                if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                    if node.func.id in CLASSES:
                        where = f"{path.name}:{node.lineno}"
                        found.append((where, node.func.id, str(keyword.value.value)))
    return found


def _answered() -> list[tuple[str, int, str]]:
    """(where, status, code) of every ``error_response(status, "code", ...)``."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "error_response"
                and len(node.args) >= 2
                and all(isinstance(a, ast.Constant) for a in node.args[:2])
            ):
                status, code = (a.value for a in node.args[:2])  # type: ignore[attr-defined]
                found.append((f"{path.name}:{node.lineno}", int(status), str(code)))
    return found


def test_the_scan_finds_the_codes_it_must() -> None:
    codes = {code for _, _, code in _raised()}
    assert {"headers_too_large", "unencodable", "id_reused", "dead", "unknown_group"} <= codes
    assert {code for _, _, code in _answered()} >= {"invalid_json", "internal"}


def test_every_code_raised_is_in_the_table_with_its_status() -> None:
    for where, name, code in _raised():
        assert code in CODES, f"{where}: {name}(code={code!r}) is not in errors.CODES"
        assert CODES[code].status == CLASSES[name].status, f"{where}: {code!r}"


def test_every_code_answered_is_in_the_table_with_its_status() -> None:
    for where, status, code in _answered():
        assert status_of(code) == status, f"{where}: {code!r}"


@pytest.mark.parametrize("kind", [CLASSES[name] for name in sorted(CLASSES)])
def test_every_errors_own_code_is_in_the_table(kind: type[ReliableMsgError]) -> None:
    assert status_of(kind.code) == kind.status


@pytest.mark.parametrize("code", sorted(CODES))
def test_a_batch_item_gets_the_error_of_its_status(code: str) -> None:
    [item] = _items(
        {"results": [{"id": "x", "ok": False, "error": {"code": code, "message": "m"}}]}
    )
    assert item.error is not None and item.error.code == code
    transient = isinstance(item.error, TRANSIENT)
    assert transient == (CODES[code].status >= 500 or code == "rate_limited"), code


def test_a_permanent_item_is_not_taken_for_an_outage() -> None:
    for code in ("headers_too_large", "unencodable", "unpublishable", "id_reused", "dead"):
        [item] = _items(
            {"results": [{"id": "x", "ok": False, "error": {"code": code, "message": ""}}]}
        )
        assert not isinstance(item.error, TRANSIENT), code
