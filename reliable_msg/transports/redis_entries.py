"""A fallback shard's entry: its fields as the writer stores them and as a reader parses
them (:class:`Entry`, or :class:`Malformed` with the reason no handler can take it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from reliable_msg.message import Publication


def entry_fields(out: Publication) -> dict[str, str]:
    return {
        "id": out.id,
        "topic": out.topic,
        "producer": out.producer,
        "payload": out.payload,
        "headers": json.dumps(out.headers),
        "key": out.key or "",
        "attempt": str(out.attempt),
        "created_at": out.created_at.isoformat(),
    }


@dataclass(frozen=True, slots=True)
class Entry:
    """One fallback entry as a consumer reads it."""

    stream: str
    entry_id: str
    id: str
    topic: str
    producer: str
    payload: Any  #: decoded from JSON
    headers: dict[str, Any]
    key: str | None
    attempt: int
    created_at: datetime
    fields: dict[str, str]  #: as stored, for the dead stream

    @classmethod
    def parse(cls, stream: str, entry_id: str, raw: dict[Any, Any]) -> Entry | Malformed:
        """The entry, or :class:`Malformed` with the reason no handler can take it."""
        fields = {text(k, "replace"): text(v, "replace") for k, v in raw.items()}
        try:
            _fields(raw)  # strict: a field that is not UTF-8 is malformed
            if not fields.get("id"):
                raise ValueError("no id")
            headers = json.loads(fields.get("headers") or "{}")
            if not isinstance(headers, dict):
                raise ValueError("headers are not a JSON object")
            return cls(
                stream=stream,
                entry_id=entry_id,
                id=fields["id"],
                topic=fields["topic"],
                producer=fields["producer"],
                payload=_json(fields["payload"]),
                headers=headers,
                key=fields.get("key") or None,
                attempt=int(fields.get("attempt", "1")),
                created_at=datetime.fromisoformat(fields["created_at"]),
                fields=fields,
            )
        except KeyError as exc:
            return Malformed(stream, entry_id, fields, f"no {exc.args[0]} field")
        except (ValueError, TypeError) as exc:
            return Malformed(stream, entry_id, fields, str(exc))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"payload is not JSON: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Malformed:
    """A fallback entry no handler can take, and why."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    reason: str


#: What a read of the shards finds.
Read = Entry | Malformed


def entries(reply: Any) -> list[Read]:
    """The entries of an ``XREADGROUP`` reply."""
    found: list[Read] = []
    for stream, items in reply or []:
        for entry_id, fields in items:
            if fields:
                found.append(Entry.parse(text(stream), text(entry_id), fields))
    return found


def _fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}


def text(value: Any, errors: str = "strict") -> str:
    """``value`` (bytes from a client without ``decode_responses``) as text."""
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)
