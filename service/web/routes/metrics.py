"""`/metrics`: the Prometheus exposition (`service.metrics`), for the monitoring server.

The request must carry `Authorization: Bearer <metrics_token>` (GATEKEEPER_METRICS_TOKEN, compared in
constant time), else 401; with no token set, every request gets 401 unless `metrics_open` says the
endpoint may be read by anyone who reaches it. The answer holds counts, states, ages and model
versions (AE titles only with `metrics_ae_title_labels`), never patient data.
"""

# No `from __future__ import annotations`: FastAPI reads the parameter types at run time.
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(request: Request) -> Response:
    """Every gatekeeper metric in Prometheus' text format; 401 without the bearer token (see above)."""
    settings = request.app.state.settings
    refusal = metrics.refusal(settings, request.headers.get("authorization"))
    if refusal is not None:
        return Response(
            refusal + "\n", status_code=401, media_type="text/plain", headers={"WWW-Authenticate": "Bearer"}
        )
    registry = metrics.scrape_registry(settings, request.app.state.sessions)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
