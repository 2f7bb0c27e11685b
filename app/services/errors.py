"""Domain errors. Messages are safe to show to the user and say what to fix.

One place (app/errors.py) turns them into an HTML page, an htmx partial or a
JSON problem; services and routes never translate them themselves.
"""


class DomainError(Exception):
    status_code = 400
    title = "Bad request"

    def __init__(self, message: str, *, errors: dict[str, str] | list[str] | None = None):
        super().__init__(message)
        self.message = message
        # Per-field messages ({"k": "must be 2..9"}) or numbered lines ("line 3: ...").
        self.errors = errors or {}


class NotAuthenticated(DomainError):
    status_code = 401
    title = "Sign in required"


class NotAllowed(DomainError):
    status_code = 403
    title = "Not allowed"


class NotFound(DomainError):
    status_code = 404
    title = "Not found"


class Conflict(DomainError):
    status_code = 409
    title = "Conflict"


class Invalid(DomainError):
    status_code = 422
    title = "Invalid input"


class RateLimited(DomainError):
    status_code = 429
    title = "Too many attempts"


def raise_for_fields(errors: dict[str, str]) -> None:
    """Raise Invalid naming every field of `errors` (field -> message), if there is any."""
    if errors:
        raise Invalid("Please correct the highlighted fields: " + ", ".join(errors) + ".", errors=errors)
