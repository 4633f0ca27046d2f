"""The scanners: check-back of pending messages, redelivery of unacked deliveries and
retention purge, each a job of the instance's scheduler.

Every pass claims due rows with ``FOR UPDATE SKIP LOCKED`` (or a lease), so instances
running side by side never handle the same row at once.
"""

from __future__ import annotations

from reliable_msg.service.scanners.checkback import CheckBackScanner, Slots
from reliable_msg.service.scanners.purger import Purger
from reliable_msg.service.scanners.redelivery import RedeliveryScanner
from reliable_msg.service.scanners.scheduler import Scanners

__all__ = ["CheckBackScanner", "Purger", "RedeliveryScanner", "Scanners", "Slots"]
