"""Retention: delete finished messages, and free the ids of purged ones."""

from __future__ import annotations

import logging

from reliable_msg.service.ports import Store
from reliable_msg.service.settings import Settings

log = logging.getLogger(__name__)


class Purger:
    """Deletes ``done`` and ``cancelled`` messages older than the retention period."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store

    async def run_once(self) -> int:
        cfg = self._settings.scanner
        batch = max(cfg.batch, 1000)
        deleted = await self._store.purge(cfg.retention, batch=batch)
        if deleted:
            log.info("purged %d finished messages", deleted)
        if cfg.id_retention is not None:
            freed = await self._store.forget_ids(cfg.id_retention, batch=batch)
            if freed:
                log.info("freed %d ids of purged messages", freed)
        return deleted
