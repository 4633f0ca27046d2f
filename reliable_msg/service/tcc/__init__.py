"""The TCC coordinator (issue 13), in the service's own process and database.

Here now: :mod:`.states`, the state machine of transactions and branches with the guard
SQL of every move. Coming next (issue 13 in progress): the store (guarded updates of
``rmsg_tcc_*``, migration ``0005_tcc.sql``), the use-cases (begin, register, commit,
cancel, get, list, retry now), the ``/v1/tcc/`` HTTP API, and the driver that claims due
transactions and calls every branch's Confirm or Cancel until it answers 200. Its
settings are ``[participants.<name>]`` and ``[tcc]`` in :mod:`reliable_msg.service.settings`.
"""
