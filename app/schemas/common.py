"""Types every schema shares: ids, offsets, storable text, and the problem document of every error."""

from typing import Annotated

from annotated_types import Interval
from pydantic import AfterValidator, BaseModel, Field, ValidationError

from app.services.validation import MAX_ID, text_problem

# Every id a request carries (path, query, form or JSON body): what fits the integer
# columns, so a larger one is a 422 naming the parameter, never a database error.
Id = Annotated[int, Interval(ge=1, le=MAX_ID)]
# Offsets into long lists; a database `bigint` takes no more.
Offset = Annotated[int, Interval(ge=0, le=MAX_ID)]


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


# Every free text a request carries: no NUL or lone surrogate (PostgreSQL stores neither),
# refused with a 422 naming the field.
Text = Annotated[str, AfterValidator(_storable)]


def error_lines(exc: ValidationError) -> list[str]:
    """A body's validation errors as "field.path: message" lines (for an Invalid's errors)."""
    return [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]


class Problem(BaseModel):
    """Every error of the API (RFC 9457 problem details), written by app/errors.py."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = Field(description="What is wrong and what to do.")
    errors: dict[str, str] | list[str] | None = Field(
        default=None, description="Per field ({\"name\": \"required\"}) or per line (\"line 3: ...\"); left out when none.")


def problem_response(description: str) -> dict:
    """An OpenAPI response entry: a problem, as app/errors.py sends it (application/problem+json)."""
    return {"description": description,
            "content": {"application/problem+json": {"schema": Problem.model_json_schema()}}}


# Declared on every route: refusals, bad input and (never expected) server errors are problems.
PROBLEM_RESPONSES: dict[int | str, dict] = {
    "4XX": problem_response("Refused: not signed in, not allowed, not found, conflict, invalid input"
                            " (`errors` names each field or line), body too large, too many attempts."),
    "5XX": problem_response("Server error, logged with the request's id (X-Request-ID)."),
}
