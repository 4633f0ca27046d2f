"""The operators' web dashboard, served by the service under ``/dashboard``.

Log in with the admin token; a signed, HttpOnly, SameSite=Strict cookie keeps the
session (see :mod:`.session`). Pages: an overview (live counts, rates over time, topics,
groups, broker mode, switch history and fallback depth), a searchable message list, a
message's detail with its history of transitions, and requeue of one dead message or of
all dead messages of a group, each behind a confirmation; TCC transactions by status,
participant and stalled, a transaction's branches and event log, and retry now behind
a confirmation. Server-rendered Jinja2 templates plus one small script and one
stylesheet, shipped in the package; nothing is loaded from another origin.
"""

from reliable_msg.service.dashboard.routes import router

__all__ = ["router"]
