"""reliable-msg: all-or-nothing delivery between services over RabbitMQ."""

__version__ = "0.1.0"
