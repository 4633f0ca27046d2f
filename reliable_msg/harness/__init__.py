"""What the tools share and the service never runs: free ports, config files, service
processes started, awaited and stopped, the machine's RabbitMQ, Redis and PostgreSQL
stopped, killed and started again, and a TCP proxy that injects network faults.

Used by the tests, the demo, the soak run and ``reliable-msg bench`` (hence in the wheel);
``tcc_party`` is a TCC participant server (``python -m reliable_msg.harness.tcc_party``).
"""
