"""Serving an ASGI app on a real localhost port inside the test's event loop (the
harness's :func:`~reliable_msg.harness.asgi.serving_app`, which the tools use too)."""

from reliable_msg.harness.asgi import serving_app

__all__ = ["serving_app"]
