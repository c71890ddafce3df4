"""The FastAPI application."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from service.console.router import router as console_router
from service.core.config import get_settings
from service.core.deps import single_valued_query
from service.core.errors import install_error_handlers
from service.core.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.curation.endpoints import me_router
from service.curation.endpoints import router as curation_router
from service.datasets.endpoints import router as datasets_router
from service.fine_tuning.checkpoint_endpoints import router as checkpoints_router
from service.fine_tuning.endpoints import router as fine_tuning_router
from service.health.endpoints import router as health_router
from service.openapi_document import complete
from service.roles.endpoints import router as roles_router
from service.scoring_jobs.endpoints import router as scoring_router
from trainer.jailbreaks import available_sets

log = logging.getLogger(__name__)

DESCRIPTION = """
Upload a character (role) and its training dialogues, score them with the base
model's implicit rewards (SaRFT's role-adaptive data selection), and download
the flagged harmful subset; fine-tune with SaRFT's loss, evaluate safety and
role fidelity, and download the report and the trained adapter. Authenticate
with `Authorization: Bearer <API key>`.
Errors are `{"error": {"code", "message", "param"}}`.
"""


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="sarft",
        version="0.1.0",
        description=DESCRIPTION,
        dependencies=[Depends(single_valued_query)],
    )
    install_error_handlers(app)
    for router in (
        health_router,
        roles_router,
        datasets_router,
        scoring_router,
        curation_router,
        me_router,
        fine_tuning_router,
        checkpoints_router,
    ):
        app.include_router(router)
    app.include_router(console_router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generated = get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes,
            )  # fmt: skip
            app.openapi_schema = complete(
                generated, settings.allowed_models, set(available_sets(settings.eval_set_paths))
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
