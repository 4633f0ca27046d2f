"""The consumer SDK's public names stay importable from ``reliable_msg.sdk.consumer``
(a package of modules since issue 12): a name that disappears fails here."""

from __future__ import annotations

import reliable_msg.sdk.consumer as consumer_sdk
from reliable_msg.sdk.consumer import acks, amqp, consumer, fallback, inbox, settle

#: The names code outside the package uses (tests, demos, bench), and its public API.
PUBLIC = {
    "Conn",
    "Consumer",
    "Handler",
    "INBOX_TABLE",
    "Poison",
    "Received",
    "Source",
    "install",
    "purge_inbox",
}


def test_the_public_names_are_exported() -> None:
    assert set(consumer_sdk.__all__) >= PUBLIC
    for name in consumer_sdk.__all__:
        assert hasattr(consumer_sdk, name), name


def test_every_module_logs_as_the_sdk() -> None:
    """One logger name for the whole SDK, the one users configure and filter on."""
    assert consumer_sdk.log.name == "reliable_msg.sdk.consumer"
    for module in (acks, amqp, consumer, fallback, inbox, settle):
        assert module.log is consumer_sdk.log, module.__name__
