"""The TOML config file a tool writes for the ``reliable-msg serve`` it starts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reliable_msg.service.settings import Settings


def settings_data(settings: Settings) -> dict[str, Any]:
    """Everything ``settings`` holds, tokens included, as plain data for :func:`toml`."""
    data = settings.model_dump(
        mode="json", exclude={"producers", "groups", "participants", "admin_token"}
    )
    if settings.admin_token is not None:
        data["admin_token"] = settings.admin_token.get_secret_value()
    data["producers"] = {
        name: {"check_url": str(p.check_url), **_token(p.token)}
        for name, p in settings.producers.items()
    }
    data["groups"] = {
        name: {**g.model_dump(mode="json", exclude={"token"}), **_token(g.token)}
        for name, g in settings.groups.items()
    }
    data["participants"] = {
        name: {**p.model_dump(mode="json", exclude={"token"}), **_token(p.token)}
        for name, p in settings.participants.items()
    }
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` as TOML; returns ``path``."""
    path.write_text(toml(data))
    return path


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a settings dict: scalars, lists and nested tables. TOML has no
    null: a None is left out, so the setting keeps its default."""
    lines, tables = [], []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_value(value)}")
    out = "\n".join(lines) + "\n"
    for key, value in tables:
        name = f"{prefix}{key}"
        out += f"\n[{name}]\n" + toml(value, f"{name}.")
    return out


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def _token(token: Any) -> dict[str, str]:
    return {"token": token.get_secret_value()} if token is not None else {}
