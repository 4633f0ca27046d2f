"""The demo's consumer groups by name."""

from __future__ import annotations

from . import credit, inventory, wms
from .group import Group

GROUPS: dict[str, Group] = {g.name: g for g in (inventory.GROUP, credit.GROUP, wms.GROUP)}
