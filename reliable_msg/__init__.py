"""reliable-msg: all-or-nothing delivery between services over RabbitMQ.

The SDKs' public names and their errors, from one place (the same as
:mod:`reliable_msg.sdk`'s)::

    from reliable_msg import Consumer, Producer, ReliableMsgError

An SDK name is imported on first use (see :mod:`reliable_msg.sdk`), so that the service
and the command line, which import this package first, do not load the SDKs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reliable_msg.sdk import __all__ as __all__

if TYPE_CHECKING:
    from reliable_msg.sdk import *  # noqa: F403

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # import_module, not "from reliable_msg import sdk", which would ask this function.
    value = getattr(importlib.import_module("reliable_msg.sdk"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
