"""Reading an import from a request: a multipart form (file upload or pasted
text, from the page or the API) or a JSON body {"format", "content"}: prompts
(read_import_payload) or preferences (read_preference_payload, which keeps the
upload as a file to stream)."""

import re
from dataclasses import dataclass
from typing import IO

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app.schemas.common import error_lines
from app.schemas.prompt_sets import PreferenceImportBody, PromptImportBody
from app.services.errors import Invalid
from app.services.prompt_import import LIMITS, check_size

# Pasted text is echoed back into the form after an error only up to this size.
ECHO_LIMIT_CHARS = 1_000_000
# The routes that take files: they get the upload limit (Settings.max_upload_bytes)
# instead of the body limit (app/main.py BodyLimitMiddleware).
UPLOAD_PATH = re.compile(
    r"/(api/v1|admin)/prompt-sets/[^/]+/(prompts|demonstrations|preferences)|/admin/demonstrations/import")


@dataclass
class ImportPayload:
    file_data: bytes | None = None
    # The upload's real size: only the first limit + 1 bytes are read.
    file_size: int | None = None
    filename: str | None = None
    content: str = ""
    format: str = "auto"
    # A JSON body's content is the file itself, even when empty.
    from_json: bool = False

    def data(self) -> bytes | str:
        """The bytes of the file or the pasted text; Invalid if neither or both were sent."""
        if self.from_json:
            return self.content
        if self.file_data is not None and self.content.strip():
            raise Invalid("Choose a file or paste prompts, not both.",
                          errors=["choose a file or paste prompts, not both"])
        if self.file_data is not None:
            check_size(max(self.file_size or 0, len(self.file_data)))
            return self.file_data
        if self.content.strip():
            return self.content
        raise Invalid("Choose a file to upload or paste prompts into the text box.",
                      errors=["no file chosen and nothing pasted"])

    @property
    def echo(self) -> str:
        return self.content if len(self.content) <= ECHO_LIMIT_CHARS else ""


async def read_import_payload(request: Request) -> ImportPayload:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        # Pasted text may be as large as a file: lift Starlette's 1 MB limit per field.
        form = await request.form(max_part_size=LIMITS.max_file_bytes + 1)
        payload = ImportPayload(format=str(form.get("format") or "auto"))
        content = form.get("content")
        payload.content = content if isinstance(content, str) else ""
        upload = form.get("file")
        # Browsers send an empty part with no filename when no file was chosen.
        if isinstance(upload, UploadFile) and (upload.filename or upload.size):
            payload.file_data = await upload.read(LIMITS.max_file_bytes + 1)
            payload.file_size = upload.size
            payload.filename = upload.filename
        return payload
    body = await request.body()  # its size is bounded by the app's upload limit (app/main.py)
    try:
        parsed = PromptImportBody.model_validate_json(body)
    except ValidationError as exc:
        raise Invalid("Send JSON like {\"format\": \"jsonl\", \"content\": \"...\"}"
                      " or a multipart form with a 'file' field.", errors=error_lines(exc)) from None
    return ImportPayload(content=parsed.content, format=parsed.format, from_json=True)


@dataclass
class PreferencePayload:
    source_name: str = ""
    format: str = "auto"
    file: IO[bytes] | None = None  # the upload, spooled to disk by Starlette when large
    content: str = ""
    from_json: bool = False

    def data(self) -> IO[bytes] | str:
        """The uploaded file or the pasted text; Invalid if neither or both were sent."""
        if self.from_json:
            return self.content
        if self.file is not None and self.content.strip():
            raise Invalid("Choose a file or paste preferences, not both.",
                          errors=["choose a file or paste preferences, not both"])
        if self.file is not None:
            return self.file
        if self.content.strip():
            return self.content
        raise Invalid("Choose a file to upload or paste preferences into the text box.",
                      errors=["no file chosen and nothing pasted"])

    @property
    def echo(self) -> str:
        return self.content if len(self.content) <= ECHO_LIMIT_CHARS else ""


async def read_preference_payload(request: Request) -> PreferencePayload:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_part_size=LIMITS.max_file_bytes + 1)
        payload = PreferencePayload(format=str(form.get("format") or "auto"), source_name=str(form.get("source") or ""))
        content = form.get("content")
        payload.content = content if isinstance(content, str) else ""
        upload = form.get("file")
        if isinstance(upload, UploadFile) and (upload.filename or upload.size):
            payload.file = upload.file
        return payload
    body = await request.body()  # its size is bounded by the app's upload limit (app/main.py)
    try:
        parsed = PreferenceImportBody.model_validate_json(body)
    except ValidationError as exc:
        raise Invalid("Send JSON like {\"source\": \"hh-rlhf\", \"content\": \"...\"}"
                      " or a multipart form with 'file' and 'source' fields.", errors=error_lines(exc)) from None
    return PreferencePayload(source_name=parsed.source, format=parsed.format, content=parsed.content, from_json=True)
