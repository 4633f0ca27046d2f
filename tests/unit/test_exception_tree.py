"""Every exception class defined in the package derives from the one root."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import reliable_msg
from reliable_msg.errors import ReliableMsgError


def _modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(reliable_msg.__path__, prefix="reliable_msg.")
        if not m.name.endswith("__main__")
    ]


def test_every_exception_class_of_the_package_derives_from_the_root() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            defined_here = cls.__module__ == module.__name__
            if defined_here and issubclass(cls, BaseException):
                if not issubclass(cls, ReliableMsgError):
                    strays.append(f"{name}.{cls.__qualname__}")
    assert strays == []


def test_the_walk_sees_the_modules_that_define_errors() -> None:
    # A walk that found nothing would pass the test above for nothing.
    names = _modules()
    for expected in (
        "reliable_msg.errors",
        "reliable_msg.states",
        "reliable_msg.service.store.messages",
        "reliable_msg.sdk.consumer.message",
        "reliable_msg.harness.process",
    ):
        assert expected in names
