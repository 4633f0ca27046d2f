"""The demo's three consumer groups (downstream) of ``order.paid``, one process each::

    python -m downstream_demo inventory   # products: available 100 -> 98, sold 0 -> 2
    python -m downstream_demo credit      # members: points 1190 -> 1200
    python -m downstream_demo wms         # one sale delivery order (销售出库单) per order

Each keeps its books in a schema of its own in the demo database, with the consumer
SDK's inbox table beside them. Environment: see :mod:`downstream_demo.config`.
"""
