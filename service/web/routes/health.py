"""Health endpoints: `/healthz` (liveness, no login) and `/readyz` (readiness, login required: the session
cookie; scripts and probes use `/api/readyz`, which also takes HTTP basic auth)."""

# No `from __future__ import annotations`: FastAPI reads the dependency types at run time.
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.web.deps import CurrentUser, ReadinessChecks
from service.web.schemas import Readiness

router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness: the process answers HTTP. Needs no login."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness)
@router.get("/api/readyz", response_model=Readiness)
def readyz(user: CurrentUser, checks: ReadinessChecks) -> JSONResponse:
    """Readiness: database, broker, model files, disk; 503 naming the failed checks."""
    results = [check() for check in checks]
    failed = any(r.status != "ok" for r in results)
    body = Readiness(status="failed" if failed else "ok", checks=results)
    return JSONResponse(body.model_dump(), status_code=503 if failed else 200)
