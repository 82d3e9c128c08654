"""`/metrics`: the Prometheus exposition (`service.metrics`), for the monitoring server.

No login, unless `metrics_token` (GATEKEEPER_METRICS_TOKEN) is set: then the request must carry
`Authorization: Bearer <token>` (compared in constant time), else 401. The answer holds counts,
states, ages, AE titles and model versions only, never patient data.
"""

# No `from __future__ import annotations`: FastAPI reads the parameter types at run time.
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(request: Request) -> Response:
    """Every gatekeeper metric in Prometheus' text format; 401 without the bearer token when one is set."""
    settings = request.app.state.settings
    token = settings.metrics_token.get_secret_value()
    if token and not metrics.token_matches(request.headers.get("authorization"), token):
        return Response(
            "metrics need a bearer token\n",
            status_code=401,
            media_type="text/plain",
            headers={"WWW-Authenticate": "Bearer"},
        )
    registry = metrics.scrape_registry(settings, request.app.state.sessions)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
