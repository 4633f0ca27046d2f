"""The HTTP API (README: HTTP API): routes parse, authorise and call a use-case; no SQL here.

- :mod:`.app`: :func:`create_app`, the FastAPI app with its middleware and routers
- :mod:`.errors`: every error answered as ``{"error": {"code", "message"}}``, and the
  limit on request bodies
- :mod:`.deps`: what the routes take: the runtime, the use-cases, a token of a role
- :mod:`.answers`: the JSON answers routes write themselves (a message, a batch)
- :mod:`.messages`: the producers' calls: prepare, confirm, cancel, read
- :mod:`.deliveries`: the consumer groups' calls: ack
- :mod:`.admin`: the admin's calls: list, requeue, stats
- :mod:`.probes`: ``/healthz``, ``/readyz`` and ``/metrics``, which take no token
"""

from reliable_msg.service.api.app import create_app

__all__ = ["create_app"]
