"""What the API's routes take: the runtime, the use-cases, and a token of a role."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Request

from reliable_msg.service.auth import Principal, Role
from reliable_msg.service.group_commit import GroupCommit
from reliable_msg.service.runtime import Runtime
from reliable_msg.service.schemas import MessageId
from reliable_msg.service.usecases import UseCases


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


# Dependencies are coroutines on purpose: FastAPI runs plain functions in a thread pool,
# a thread hop per dependency per request.


async def _usecases(request: Request) -> UseCases:
    return runtime_of(request).usecases


async def _group_commit(request: Request) -> GroupCommit:
    return runtime_of(request).group_commit


def _role(*roles: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """The dependency admitting a request whose token has one of ``roles``.

    One dependency rather than a role check over a shared token dependency: FastAPI
    resolves each per request, and the second cost the single-message API's hot routes
    about a tenth of their framework time.
    """

    async def admit(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        address = request.client.host if request.client is not None else "unknown"
        # ``authorization`` documents the header in OpenAPI; the check reads every copy,
        # since FastAPI hands over only the first.
        every = request.headers.getlist("authorization")
        return runtime_of(request).auth.admit(every, address).require(*roles)

    return admit


UseCasesOf = Annotated[UseCases, Depends(_usecases)]
#: prepare, confirm and ack under group commit: what the producers' and groups' routes use
GroupCommitOf = Annotated[GroupCommit, Depends(_group_commit)]
Producer = Annotated[Principal, Depends(_role(Role.PRODUCER))]
Group = Annotated[Principal, Depends(_role(Role.GROUP))]
Admin = Annotated[Principal, Depends(_role(Role.ADMIN))]
Reader = Annotated[Principal, Depends(_role(Role.PRODUCER, Role.ADMIN))]
PathId = Annotated[MessageId, Path()]
