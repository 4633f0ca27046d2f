"""The demo's order service (upstream): paying an order emits ``order.paid``.

It keeps its orders in schema ``orders`` of the demo database, next to the producer
SDK's marker table, and answers the service's check-back at ``/rmsg/check-back``::

    python -m upstream_demo --port 8481

Environment: ``DEMO_DATABASE_URL``, ``DEMO_SERVICE_URL`` and ``DEMO_ORDER_TOKEN``
(see :mod:`upstream_demo.config`).
"""
