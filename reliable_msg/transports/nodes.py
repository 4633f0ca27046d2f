"""The nodes of one RabbitMQ cluster, as ``amqp_url`` gives them (README: Running on
clusters): one URL, a list of URLs, or one string with the URLs separated by commas
(the form of ``RMSG_AMQP_URL``). One parser for the service's setting and the consumer
SDK's ``Consumer(amqp_url=...)``.

A comma inside a URL (in a password, say) must be percent-encoded (``%2C``). The
connection options of a URL's query (``?heartbeat=...``, the TLS files) apply to the
connections to that node only: give them on every node.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

SCHEMES = ("amqp", "amqps")
_DEFAULT_PORT = {"amqp": 5672, "amqps": 5671}


def amqp_nodes(value: str | Sequence[str]) -> tuple[str, ...]:
    """The node URLs of ``value``, in the order given.

    Raises :class:`ValueError` with a clear message for no node, an empty item, a scheme
    other than ``amqp``/``amqps``, a comma inside a listed URL, or the same node twice.
    No message shows a password.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or (isinstance(value, str) and not value.strip()):
        raise ValueError("no RabbitMQ node given: expected one amqp:// URL or several")
    nodes: list[str] = []
    seen: dict[tuple[str, str, int, str], int] = {}
    for number, item in enumerate(items, 1):
        if not isinstance(item, str):
            raise ValueError(f"node {number} is not a string: {type(item).__name__}")
        url = item.strip()
        if not url:
            raise ValueError(f"node {number} of {len(items)} is empty (a stray comma?)")
        try:
            parts = urlsplit(url)
        except ValueError:  # an unclosed "[" of an IPv6 host
            raise ValueError(f"node {number} is not a URL") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(
                f"node {number} ({where(url)}) must be an amqp:// or amqps:// URL, "
                f"not {parts.scheme + '://' if parts.scheme else 'one without a scheme'}"
            )
        try:
            port = parts.port or _DEFAULT_PORT[scheme]
        except ValueError:  # not the port's text: it may be a password without its host
            raise ValueError(
                f"node {number} ({where(url)}) has a bad port (a number up to 65535 after the host)"
            ) from None
        if "," in url:  # only from a list: the settings keep it in the comma form
            raise ValueError(f"node {number} ({where(url)}) has a comma: percent-encode it as %2C")
        key = (scheme, (parts.hostname or "localhost").lower(), port, vhost(parts.path))
        if key in seen:
            raise ValueError(
                f"node {number} ({where(url)}) is node {seen[key]} again: each node once"
            )
        seen[key] = number
        nodes.append(url)
    return tuple(nodes)


def vhost(path: str) -> str:
    """The virtual host a URL's path names, as aiormq reads it: ``/`` for no path, ``/``
    and ``/%2F`` alike."""
    return unquote(path[1:]) or "/"


def where(url: str) -> str:
    """``host:port`` of a node URL, for logs and messages: never its credentials."""
    parts = urlsplit(url.strip())
    host = parts.hostname or "localhost"
    try:
        port = parts.port or _DEFAULT_PORT.get(parts.scheme.lower(), 5672)
    except ValueError:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
