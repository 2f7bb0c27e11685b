"""An export of a set's labels as the query asks for it (format and filters), and its
streamed file and sidecar: shared by the export page's downloads and the JSON API."""

from typing import Annotated

from fastapi import Depends, Query
from fastapi.responses import JSONResponse, StreamingResponse

from app.routes.deps import SessionDep
from app.schemas.common import Id
from app.services import export
from app.web import download_headers

FORMATS = "comparisons: plain | conversational; annotations: jsonl | csv; votes: votes"
Text = Annotated[str | None, Query(max_length=50)]
Ids = Annotated[list[str] | None, Query()]


def export_plan(session: SessionDep, prompt_set_id: Id,
                fmt: Annotated[str, Query(alias="format", max_length=20, description=FORMATS)] = "plain",
                kind: Text = None, split: Text = None, labelers: Ids = None, min_agreement: Text = None,
                date_from: Text = None, date_to: Text = None) -> export.ExportPlan:
    """The export the query asks for; bad filters are an Invalid naming them."""
    filters = export.parse_filters(prompt_set_ids=prompt_set_id, split=split, labelers=labelers,
                                   min_agreement=min_agreement, date_from=date_from, date_to=date_to)
    return export.plan_export(session, kind=kind or export.kind_of(fmt), fmt=fmt, filters=filters)


# Declared after the role check in each route, so a refused user's query is never read.
ExportPlan = Annotated[export.ExportPlan, Depends(export_plan)]


def stream(session, plan: export.ExportPlan) -> StreamingResponse:
    return StreamingResponse(
        export.iter_export(session, plan), media_type=plan.media_type,
        headers=download_headers(plan.filename),
    )


def meta_response(session, plan: export.ExportPlan) -> JSONResponse:
    return JSONResponse(export.export_meta(session, plan), headers=download_headers(f"{plan.filename}.meta.json"))
