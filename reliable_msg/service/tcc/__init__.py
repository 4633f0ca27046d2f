"""The TCC coordinator (issue 13), in the service's own process and database.

- ``states``: the state machine of transactions and branches, with the guard SQL of every
  move
- ``transaction``: transactions, branches and events as the coordinator sees them
- ``ports``: what the use-cases need of a store; ``store``: that store in PostgreSQL
  (``rmsg_tcc_*``, migration ``0005_tcc.sql``)
- ``usecases``: begin, register, commit, cancel, get, list, retry now, purge
- ``schemas``: the bodies of the ``/v1/tcc/`` API (its routes: ``service/api/tcc.py``)

Still to come (issue 13 in progress): the driver that claims due transactions and calls
every branch's Confirm or Cancel until it answers 200. Its settings are
``[participants.<name>]`` and ``[tcc]`` in :mod:`reliable_msg.service.settings`.
"""
