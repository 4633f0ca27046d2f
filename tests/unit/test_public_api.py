"""The SDK's public names: importable from ``reliable_msg`` and ``reliable_msg.sdk``,
listed in their ``__all__``, the same objects as in their modules; and importing the
package loads no SDK module until a name is used."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import ModuleType

import pytest

import reliable_msg
import reliable_msg.sdk
from reliable_msg.errors import ReliableMsgError

#: Every public name, with the module that defines it. Users' code imports these: one
#: that disappears breaks it.
EXPECTED = {
    "Producer": "reliable_msg.sdk.producer",
    "Outgoing": "reliable_msg.sdk.producer",
    "Sent": "reliable_msg.sdk.producer",
    "ConfirmBatching": "reliable_msg.sdk.producer",
    "check_back_router": "reliable_msg.sdk.producer",
    "purge_markers": "reliable_msg.sdk.producer",
    "Consumer": "reliable_msg.sdk.consumer",
    "Received": "reliable_msg.sdk.consumer",
    "Poison": "reliable_msg.sdk.consumer.message",
    "purge_inbox": "reliable_msg.sdk.consumer",
    "ServiceClient": "reliable_msg.sdk.client",
    "RetryPolicy": "reliable_msg.sdk.client",
    "ItemResult": "reliable_msg.sdk.client",
    "Initiator": "reliable_msg.sdk.tcc.initiator",
    "GlobalTransaction": "reliable_msg.sdk.tcc.initiator",
    "Branch": "reliable_msg.sdk.tcc.initiator",
    "Participant": "reliable_msg.sdk.tcc.participant",
    "Call": "reliable_msg.sdk.tcc.call",
    "purge_barriers": "reliable_msg.sdk.tcc.barrier",
    **{
        name: "reliable_msg.errors"
        for name in (
            "ReliableMsgError",
            "Code",
            "FallbackUnavailable",
            "MethodNotAllowed",
            "RequestError",
            "BadRequest",
            "Unauthorized",
            "Forbidden",
            "NotFound",
            "Conflict",
            "PayloadTooLarge",
            "Unprocessable",
            "RateLimited",
            "BrokerError",
            "BrokerUnavailable",
            "Unroutable",
            "Unpublishable",
            "StoreError",
            "ServiceUnavailable",
            "Fenced",
            "Refused",
            "TryRefused",
            "TryFailed",
        )
    },
}

PACKAGES = [reliable_msg, reliable_msg.sdk]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_public_name_is_exported(package: ModuleType) -> None:
    missing = sorted(set(EXPECTED) - set(package.__all__))
    assert not missing, f"{package.__name__}.__all__ lacks {missing}"
    for name, home in EXPECTED.items():
        home_value = getattr(importlib.import_module(home), name)
        assert getattr(package, name) is home_value, f"{package.__name__}.{name}"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.__name__)
def test_every_name_in_all_resolves(package: ModuleType) -> None:
    for name in package.__all__:
        assert hasattr(package, name), f"{package.__name__}.__all__ names {name}, unknown"
    assert set(package.__all__) <= set(dir(package))


def test_the_errors_exported_are_the_one_tree() -> None:
    names = [n for n, home in EXPECTED.items() if home.endswith("errors") and n != "Code"]
    assert all(issubclass(getattr(reliable_msg, n), ReliableMsgError) for n in names)
    assert "Poison" not in names and issubclass(reliable_msg.Poison, ReliableMsgError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = reliable_msg.Nothing
    with pytest.raises(AttributeError):
        _ = reliable_msg.sdk.Nothing


@pytest.mark.parametrize(
    "first",
    [
        "reliable_msg",
        "reliable_msg.errors",
        "reliable_msg.sdk.consumer",
        "reliable_msg.sdk.producer",
        "reliable_msg.sdk.client",
        "reliable_msg.sdk.tcc",
        "reliable_msg.service.api",
        "reliable_msg.tools.cli",
    ],
)
def test_no_import_order_is_circular(first: str) -> None:
    """A fresh interpreter imports ``first``, then every public name."""
    code = f"import {first}\nfrom reliable_msg import *\nfrom reliable_msg.sdk import *\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_importing_the_package_loads_no_sdk() -> None:
    """The service and the command line import ``reliable_msg`` first: the SDKs (and the
    consumer's RabbitMQ and Redis clients) load only when one of their names is used."""
    code = (
        "import sys, reliable_msg, reliable_msg.sdk\n"
        "print(sorted(m for m in sys.modules if m.startswith('reliable_msg.sdk.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, text=True, capture_output=True)
    assert out.stdout.strip() == "[]"
