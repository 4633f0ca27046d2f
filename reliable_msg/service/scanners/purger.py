"""Retention: delete finished messages, and free the ids of purged ones; delete finished
TCC transactions with their branches and events, and (as for message ids) free their
gids after ``scanner.id_retention``."""

from __future__ import annotations

import logging

from reliable_msg.service.ports import Store
from reliable_msg.service.settings import Settings
from reliable_msg.service.tcc.ports import TransactionStore

log = logging.getLogger(__name__)


class Purger:
    """Deletes ``done`` and ``cancelled`` messages older than the retention period, and
    (given ``tcc``) ``confirmed`` and ``cancelled`` TCC transactions older than
    ``tcc.retention``."""

    def __init__(
        self, settings: Settings, store: Store, tcc: TransactionStore | None = None
    ) -> None:
        self._settings = settings
        self._store = store
        self._tcc = tcc

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
        if self._tcc is not None:
            finished = await self._tcc.purge(self._settings.tcc.retention, batch=batch)
            if finished:
                log.info("purged %d finished TCC transactions", finished)
            if cfg.id_retention is not None:
                freed = await self._tcc.forget_gids(cfg.id_retention, batch=batch)
                if freed:
                    log.info("freed %d gids of purged TCC transactions", freed)
        return deleted
