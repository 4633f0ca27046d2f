"""The runner's one error: the demo could not run (as opposed to a run whose books do
not balance, which is a result)."""


class DemoError(Exception):
    """A process did not start or kept dying, a service did not answer, ..."""
