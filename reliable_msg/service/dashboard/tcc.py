"""The dashboard's TCC pages: transactions listed by status, participant and stalled, a
transaction's detail with its branches and event log, and "retry now" behind a
confirmation, a POST carrying the session's CSRF token like requeue. Everything goes
through the coordinator's use-cases (the admin API's list, read and retry)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from reliable_msg.errors import NotFound, ReliableMsgError
from reliable_msg.policy import ID_RE, NAME_RE
from reliable_msg.service import cursor as page_cursor
from reliable_msg.service.dashboard.visit import Visit, start_of
from reliable_msg.service.tcc.states import DRIVEN, TxStatus
from reliable_msg.service.tcc.transaction import Transaction, TxPage

#: Transactions per page of the list, unless the URL says ``limit`` (up to 500).
PAGE_SIZE = 50
#: The latest events a detail shows; it says how many older ones it leaves out.
EVENTS_SHOWN = 100
#: The stalled filter's values, as the admin API takes them.
STALLED = {"true": True, "false": False}

router = APIRouter(include_in_schema=False)


@router.get("/tcc")
async def transactions(
    request: Request,
    status: str = "",
    participant: str = "",
    stalled: str = "",
    gid: str = "",
    cursor: str = "",
    limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
) -> Response:
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    filters = {"status": status, "participant": participant, "stalled": stalled}
    filters |= {"gid": gid.strip(), "limit": str(limit)}
    if filters["gid"]:
        if await _find(visit, filters["gid"]) is not None:
            return visit.redirect(f"/tcc/{filters['gid']}")
        return _list_page(visit, filters, None, f"No transaction has the gid {gid!r}.")
    problem = _bad_filter(filters)
    if problem:
        return _list_page(visit, filters, None, problem)
    page = await visit.runtime.coordinator.page(
        status=TxStatus(status) if status else None,
        stalled=STALLED.get(stalled),
        participant=participant or None,
        initiator=None,
        limit=limit,
        before=start_of(cursor),
    )
    return _list_page(visit, filters, page, None)


@router.get("/tcc/{gid}")
async def transaction(request: Request, gid: str) -> Response:
    return await _page(request, gid, "transaction.html")


@router.get("/api/tcc/{gid}")
async def transaction_json(request: Request, gid: str) -> Response:
    """What the detail's script polls to reload when the transaction moves."""
    visit = Visit.of(request)
    if visit.session is None:
        return JSONResponse({"error": "login required"}, status_code=401)
    tx = await _find(visit, gid, last_events=1)
    if tx is None:
        return JSONResponse({"error": "no such transaction"}, status_code=404)
    return JSONResponse(
        {"gid": tx.gid, "status": tx.status.value}, headers={"Cache-Control": "no-store"}
    )


@router.get("/tcc/{gid}/retry")
async def retry_form(request: Request, gid: str) -> Response:
    return await _page(request, gid, "retry.html")


@router.post("/tcc/{gid}/retry")
async def retry(request: Request, gid: str, csrf: Annotated[str, Form()] = "") -> Response:
    visit = Visit.of(request)
    if refused := visit.refused(csrf):
        return refused
    if not ID_RE.fullmatch(gid):
        return _unknown(visit, gid)
    try:
        await visit.runtime.coordinator.retry(gid)
    except ReliableMsgError as exc:
        tx = await _find(visit, gid)
        if tx is None:
            return _unknown(visit, gid)
        return visit.render("retry.html", status=exc.status, tx=tx, why_not=exc.message)
    return visit.redirect(f"/tcc/{gid}?notice=retried")


async def _page(request: Request, gid: str, template: str) -> Response:
    """The page ``template`` of the transaction ``gid``: its detail, or the confirmation
    of retry now."""
    visit = Visit.of(request)
    if visit.session is None:
        return visit.to_login()
    tx = await _find(visit, gid)
    if tx is None:
        return _unknown(visit, gid)
    return visit.render(template, tx=tx, why_not=_why_not(tx))


async def _find(visit: Visit, gid: str, last_events: int = EVENTS_SHOWN) -> Transaction | None:
    """The transaction ``gid`` with its latest events, or None for an unknown gid or one
    that is not a gid."""
    if not ID_RE.fullmatch(gid):
        return None
    try:
        return await visit.runtime.coordinator.get(gid, None, last_events=last_events)
    except NotFound:
        return None


def _unknown(visit: Visit, gid: str) -> HTMLResponse:
    text = f"No transaction has the gid {gid!r}."
    return visit.render("error.html", status=404, text=text, back="tcc", back_name="transactions")


def _why_not(tx: Transaction) -> str | None:
    """Why retry now would be refused, shown before the operator tries."""
    if tx.status in DRIVEN:
        return None
    return f"It is {tx.status}: only a confirming or cancelling transaction is retried."


def _bad_filter(filters: dict[str, str]) -> str | None:
    if filters["status"] and filters["status"] not in TxStatus._value2member_map_:
        return f"{filters['status']!r} is not a status."
    if filters["participant"] and not NAME_RE.fullmatch(filters["participant"]):
        return f"{filters['participant']!r} is not a participant's name."
    if filters["stalled"] and filters["stalled"] not in STALLED:
        return f"{filters['stalled']!r} is not true or false."
    return None


def _list_page(
    visit: Visit, filters: dict[str, str], page: TxPage | None, problem: str | None
) -> HTMLResponse:
    return visit.render(
        "transactions.html",
        status=404 if problem and filters["gid"] else 200,
        filters=filters,
        transactions=page.transactions if page else [],
        next_cursor=page_cursor.encode(page.next_cursor) if page else None,
        problem=problem,
        statuses=list(TxStatus),
        participants=sorted(visit.runtime.settings.participants),
    )
