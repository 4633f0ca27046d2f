"""The order service's settings, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Database of the demo services; the order service uses its schema ``orders``.
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rmsg_demo"
#: The reliable-msg service the order service prepares and confirms messages with.
DEFAULT_SERVICE_URL = "http://127.0.0.1:8480"


@dataclass(frozen=True, slots=True)
class Config:
    database_url: str
    service_url: str
    token: str  #: the producer token of ``order``; also checked on check-back calls

    @classmethod
    def from_env(cls) -> Config:
        token = os.environ.get("DEMO_ORDER_TOKEN")
        if not token:
            raise SystemExit("upstream_demo: set DEMO_ORDER_TOKEN to the producer token")
        return cls(
            database_url=os.environ.get("DEMO_DATABASE_URL", DEFAULT_DATABASE_URL),
            service_url=os.environ.get("DEMO_SERVICE_URL", DEFAULT_SERVICE_URL),
            token=token,
        )
