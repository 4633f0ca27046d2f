"""The e-commerce demo of reliable-msg (README: The demo), run by ``python -m demo``.

It starts the service, the order service (:mod:`upstream_demo`) and the three consumer
groups (:mod:`downstream_demo`) as processes of their own, pays orders through the order
service's HTTP API while injecting the seed's failures, waits until every message is
settled and then proves from the real databases that the books balance.
"""
