"""Every error code reliable-msg raises or answers is a member of ``errors.Code``, with
the error that raises it, so a batch item's code maps to the same typed error, and the
same transient-or-final decision, as a single call's HTTP status."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from reliable_msg import errors
from reliable_msg.errors import TRANSIENT, Code, ReliableMsgError
from reliable_msg.sdk.client import RETRIED, _items, error_of
from reliable_msg.states import IllegalTransition

PACKAGE = Path(errors.__file__).parent
README = PACKAGE.parent / "README.md"
CLASSES: dict[str, type[ReliableMsgError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, ReliableMsgError)
}


def _code_keywords() -> list[tuple[str, str, ast.expr]]:
    """(where, called name, value) of every ``SomeName(..., code=...)`` in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                for keyword in node.keywords:
                    if keyword.arg == "code":
                        found.append((f"{path.name}:{node.lineno}", node.func.id, keyword.value))
    return found


def _raised() -> list[tuple[str, str, Code]]:
    """(where, error class, code) of every ``SomeError(..., code=Code.X)`` in the package."""
    return [
        (where, name, Code[value.attr])
        for where, name, value in _code_keywords()
        if name in CLASSES
        and isinstance(value, ast.Attribute)
        and isinstance(value.value, ast.Name)
        and value.value.id == "Code"
    ]


def test_the_scan_finds_the_codes_it_must() -> None:
    codes = {code for _, _, code in _raised()}
    assert {
        Code.HEADERS_TOO_LARGE,
        Code.UNENCODABLE,
        Code.ID_REUSED,
        Code.DEAD,
        Code.UNKNOWN_GROUP,
        Code.INVALID_JSON,
        Code.INVALID_REQUEST,
    } <= codes


def test_no_error_is_raised_with_a_code_as_a_string() -> None:
    for where, name, value in _code_keywords():
        if name in CLASSES:
            assert not isinstance(value, ast.Constant), f"{where}: {name}(code={value.value!r})"


def test_every_code_raised_is_one_of_its_errors() -> None:
    for where, name, code in _raised():
        assert issubclass(code.error, CLASSES[name]), f"{where}: {name}(code={code})"
        assert code.status == CLASSES[name].status, f"{where}: {code}"


@pytest.mark.parametrize("kind", [CLASSES[name] for name in sorted(CLASSES)])
def test_every_errors_own_code_stands_for_it(kind: type[ReliableMsgError]) -> None:
    assert isinstance(kind.code, Code)
    assert issubclass(kind.code.error, kind)
    assert kind.code.status == kind.status


def test_the_state_machine_error_is_in_the_tree() -> None:
    assert issubclass(IllegalTransition, ReliableMsgError)
    assert IllegalTransition("x").code is Code.INTERNAL


@pytest.mark.parametrize("code", list(Code))
def test_every_code_is_answered_as_its_string(code: Code) -> None:
    assert code == code.value and str(code) == code.value and f"{code}" == code.value
    assert re.fullmatch(r"[a-z_]+", code.value)
    assert code.status == code.error.status
    assert 400 <= code.status < 600


@pytest.mark.parametrize("code", list(Code))
def test_a_batch_item_gets_the_error_of_its_status(code: Code) -> None:
    [item] = _items(
        {"results": [{"id": "x", "ok": False, "error": {"code": code.value, "message": "m"}}]}
    )
    assert item.error is not None and item.error.code == code
    assert item.error.code is code
    transient = isinstance(item.error, RETRIED)
    assert transient == (code.status >= 500 or code is Code.RATE_LIMITED), code
    if code.status < 500:
        assert type(item.error) is code.error, code


@pytest.mark.parametrize("code", list(Code))
def test_a_single_call_gets_the_error_of_its_code(code: Code) -> None:
    error = error_of(code.value, "m", code.status)
    assert error.code is code
    if code.status < 500 or issubclass(code.error, RETRIED):
        assert type(error) is code.error, code
    else:  # a fault of the service: the SDK retries it, then raises ServiceUnavailable
        assert type(error) is errors.ServiceUnavailable, code


def test_a_permanent_item_is_not_taken_for_an_outage() -> None:
    for code in ("headers_too_large", "unencodable", "unpublishable", "id_reused", "dead"):
        [item] = _items(
            {"results": [{"id": "x", "ok": False, "error": {"code": code, "message": ""}}]}
        )
        assert not isinstance(item.error, RETRIED), code


def test_a_code_the_sdk_does_not_know_keeps_its_string() -> None:
    [item] = _items(
        {"results": [{"id": "x", "ok": False, "error": {"code": "from_v9", "message": ""}}]}
    )
    # A batch item: taken for an outage, retried, then left to check-back.
    assert isinstance(item.error, errors.ServiceUnavailable) and item.error.code == "from_v9"
    # A single call: its HTTP status decides.
    assert type(error_of("from_v9", "", 409)) is errors.Conflict
    assert type(error_of("from_v9", "", 418)) is errors.RequestError
    assert type(error_of("from_v9", "", 502)) is errors.ServiceUnavailable


def test_a_known_code_with_another_status_goes_by_the_status() -> None:
    assert type(error_of(Code.HTTP_ERROR.value, "", 415)) is errors.RequestError
    assert type(error_of(Code.HTTP_ERROR.value, "", 503)) is errors.ServiceUnavailable


def test_the_transient_errors_are_outages() -> None:
    assert all(kind.status >= 500 for kind in TRANSIENT)
    assert not issubclass(errors.Unpublishable, RETRIED)


def test_the_readme_lists_every_code_with_its_status_and_error() -> None:
    text = README.read_text()
    section = text.split("### Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| `(\w+)` \|", section, re.MULTILINE)
    listed = {code: (int(status), error) for code, status, error in rows}
    missing = [code.value for code in Code if code.value not in listed]
    assert not missing, f"README's error code table lacks {missing}"
    for code in Code:
        assert listed[code.value] == (code.status, code.error.__name__), code
    assert len(rows) == len(Code), "a code in the README's table is not in errors.Code"


def test_an_answer_without_a_code_goes_by_its_status() -> None:
    for status, kind in [(400, errors.BadRequest), (404, errors.NotFound), (502, None)]:
        error = error_of(Code.HTTP_ERROR, "", status)
        assert type(error) is (kind or errors.ServiceUnavailable), status
