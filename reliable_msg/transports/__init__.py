"""How messages travel, and how they still do while RabbitMQ is down (README: When
RabbitMQ is down).

    normal    use-cases ─► SwitchingPublisher ─► RabbitMQ (rabbitmq.py) ─► queues ─► consumers
    N failed publishes in a row: the publisher trips the Switch (switch.py), a Redis hash
    every service instance and every consumer follows (pub/sub notice + re-read each poll)
    degraded  use-cases ─► SwitchingPublisher ─► FallbackWriter (redis.py) ─► group shards
              consumers' FallbackDrain (sdk) ─► FallbackReader (redis.py) ─► same handler
    recovery  Degradation.probe publishes to RabbitMQ's probe queue every probe_interval;
              its first success clears the switch; consumers drain their shards, then
              go back to RabbitMQ. Degradation (degradation.py) owns all of it per instance.

Errors leave this package translated: RabbitMQ's as ``BrokerError`` (rabbitmq.py), Redis's
as ``FallbackUnavailable`` (redis.py, switch.py), each chained ``from`` the original.
"""
