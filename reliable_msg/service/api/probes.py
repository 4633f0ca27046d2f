"""What load balancers and Prometheus ask, without a token: liveness, readiness, metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reliable_msg.service.api.deps import runtime_of
from reliable_msg.service.schemas import HealthOut, ReadyOut

router = APIRouter()


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
async def readyz(request: Request) -> JSONResponse:
    report = await runtime_of(request).readiness()
    # Degraded, the service works without RabbitMQ as long as Redis answers.
    path = report["redis"] if report["mode"] == "degraded" else report["rabbitmq"]
    ready = report["postgres"] == "ok" and path == "ok"
    report["status"] = "ready" if ready else "not_ready"
    return JSONResponse(ReadyOut(**report).model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
