"""The TCC coordinator (issue 13), in the service's own process and database.

- ``states``: the state machine of transactions and branches, with the guard SQL of every
  move
- ``transaction``: transactions, branches and events as the coordinator sees them
- ``ports``: what the use-cases and the driver need of a store; ``store``: the
  use-cases' store in PostgreSQL (``rmsg_tcc_*``, migration ``0005_tcc.sql``)
- ``usecases``: begin, register, commit, cancel, get, list, retry now (the retention
  purge is the ``Purger`` job's, on the store: ``retention``, which also remembers each
  purged gid in ``rmsg_tcc_used_gid``, migration ``0006_tcc_used_gid.sql``)
- ``schemas``: the bodies of the ``/v1/tcc/`` API (its routes: ``service/api/tcc.py``)
- ``driver``: the driver, which claims due transactions under a lease and calls every
  branch's Confirm or Cancel until it answers 2xx (the scheduler's ``tcc`` job, and a
  kick after each commit, cancel and retry now); ``rounds``: what it claims;
  ``driving``: its store in PostgreSQL

Their settings are ``[participants.<name>]`` and ``[tcc]`` in
:mod:`reliable_msg.service.settings`.
"""
