"""Importing prompts into a set from JSONL, a JSON array or CSV (uploaded or pasted).

All or nothing: the whole file is parsed and checked first, every problem is
reported with its line and field, and nothing is stored unless there are none.
Exact duplicates (same canonical messages) are skipped, inside the file and
against the prompts the set already holds.

JSONL, one prompt per line:
    {"prompt": "Write a haiku about rain."}
    {"id": "q2", "messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Why is the sky blue?"}],
     "metadata": {"source": "faq"}}
Other top-level fields are kept as metadata, as CSV columns are.

CSV: a header row with a `prompt` column (an `id` column is the prompt's id);
every other column is kept as metadata. Quoted fields may span lines.
"""

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from sqlalchemy.orm import Session

from app.db.bulk import insert_new
from app.db.enums import PromptSetStatus
from app.db.models import Prompt, PromptSet
from app.services.errors import Conflict, Invalid
from app.services.validation import JsonProblem, decode_json, load_json, text_problem
from app.services.prompt_sets import (
    SPLITS,
    canonical_messages,
    prompt_hash,
    queue_generation_if_needed,
    split_for,
)

FORMATS = ("jsonl", "json", "csv")
ROLES = ("system", "user", "assistant")
MAX_EXTERNAL_ID_CHARS = 200  # the column's length


@dataclass(frozen=True)
class ImportLimits:
    max_file_bytes: int = 20 * 1024 * 1024
    # Characters of all of a prompt's messages together.
    max_prompt_chars: int = 20_000
    max_prompts: int = 100_000
    # The metadata of one prompt, as JSON.
    max_metadata_chars: int = 10_000
    # Problems listed in the error; the message says how many more there are.
    max_errors_shown: int = 20


LIMITS = ImportLimits()


@dataclass
class ParsedPrompt:
    line: int
    messages: list[dict[str, str]]
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn: what lists and search show."""
        return self.messages[-1]["content"]


@dataclass
class ImportResult:
    added: int = 0
    duplicates_in_file: int = 0
    duplicates_existing: int = 0
    per_split: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in SPLITS})
    generation_job_id: int | None = None

    @property
    def duplicates(self) -> int:
        return self.duplicates_in_file + self.duplicates_existing

    def describe(self) -> str:
        """One sentence for a flash message or a CLI."""
        splits = ", ".join(f"{n} {s}" for s, n in self.per_split.items())
        text = f"Imported {self.added} prompt{'s' if self.added != 1 else ''} ({splits})."
        if self.duplicates:
            text += f" Skipped {self.duplicates} duplicate{'s' if self.duplicates != 1 else ''}"
            text += f" ({self.duplicates_in_file} within the file, {self.duplicates_existing} already in the set)."
        if self.generation_job_id is not None:
            text += " Generation of responses is queued."
        return text


class Problems:
    """Collects line messages; keeps the first few, counts them all."""

    def __init__(self, limits: ImportLimits):
        self.shown: list[str] = []
        self.total = 0
        self.limit = limits.max_errors_shown

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.shown) < self.limit:
            self.shown.append(message)

    def raise_if_any(self) -> None:
        if not self.total:
            return
        if self.total == 1:
            message = f"Nothing was imported: {self.shown[0]}"
        elif self.total > len(self.shown):
            message = (f"Nothing was imported: the file has {self.total:,} problems. The first "
                       f"{len(self.shown)} are listed; {self.total - len(self.shown):,} more are not shown.")
        else:
            message = f"Nothing was imported: the file has {self.total} problems, listed below."
        raise Invalid(message, errors=list(self.shown))


def fail(message: str) -> Invalid:
    """A problem with the whole file."""
    return Invalid(f"Nothing was imported: {message}", errors=[message])


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _size(n: int) -> str:
    mb = n / (1024 * 1024)
    return f"{round(mb, 1):g} MB" if mb >= 0.1 else f"{n:,} bytes"


# ---- decoding and format ----------------------------------------------------------

def check_size(n_bytes: int, *, limits: ImportLimits = LIMITS) -> None:
    """Raises Invalid when a file of n_bytes is over the limit (before reading it all)."""
    if n_bytes > limits.max_file_bytes:
        raise fail(f"file is {_size(n_bytes)} ({n_bytes:,} bytes); the limit is"
                    f" {_size(limits.max_file_bytes)}. Split it into smaller files.")


def decode(data: bytes | str, *, limits: ImportLimits = LIMITS) -> str:
    """The file's text. Raises Invalid if it is too big, empty or not UTF-8."""
    check_size(len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data), limits=limits)
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise fail(f"file is not UTF-8: byte 0x{data[exc.start]:02x} on line {line} cannot be read."
                        " Save the file as UTF-8 and import it again.") from None
    else:
        text = data.removeprefix("\ufeff")
    if not text.strip():
        raise fail("file is empty: there are no prompts in it.")
    return text


def detect_format(text: str, *, format: str | None = None, filename: str | None = None) -> str:
    """jsonl, json or csv: the format asked for, else the file's extension, else the content."""
    if format and format != "auto":
        if format not in FORMATS:
            raise Invalid(f"Unknown format '{format}'; choose one of {', '.join(FORMATS)}.",
                          errors={"format": f"must be one of {', '.join(FORMATS)}"})
        # JSON vs JSONL is told by the first character: files named .json often hold JSONL.
        if format in ("json", "jsonl"):
            return "json" if text.lstrip().startswith("[") else "jsonl"
        return format
    suffix = PurePath(filename).suffix.lower().lstrip(".") if filename else ""
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix == "csv":
        return "csv"
    start = text.lstrip()[:1]
    if start == "[":
        return "json"
    if start == "{" or suffix == "json":
        return "jsonl"
    return "csv"


# ---- one record ------------------------------------------------------------------

def check_text_field(problems: Problems, where: str, name: str, value: str) -> bool:
    problem = text_problem(value)
    if problem is not None:
        problems.add(f"{where}: {name} {problem}")
        return False
    if not value.strip():
        problems.add(f"{where}: {name} is empty")
        return False
    return True


def _external_id(problems: Problems, where: str, raw: Any) -> tuple[bool, str | None]:
    if raw is None:
        return True, None
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        problems.add(f"{where}: 'id' must be a string or a whole number, not {json_type(raw)}")
        return False, None
    value = str(raw).strip()
    if len(value) > MAX_EXTERNAL_ID_CHARS:
        problems.add(f"{where}: 'id' is {len(value):,} characters; the limit is {MAX_EXTERNAL_ID_CHARS}")
        return False, None
    problem = text_problem(value)
    if problem is not None:
        problems.add(f"{where}: 'id' {problem}")
        return False, None
    return True, value or None


def _metadata(problems: Problems, where: str, meta: dict[str, Any], limits: ImportLimits) -> bool:
    dumped = json.dumps(meta, ensure_ascii=False)
    # json.dumps writes NUL as the escape \u0000 (which jsonb refuses too) and keeps a lone surrogate as it is.
    problem = text_problem(dumped.replace("\\u0000", "\x00"))
    if problem is not None:
        problems.add(f"{where}: metadata {problem}")
        return False
    if len(dumped) > limits.max_metadata_chars:
        problems.add(f"{where}: metadata is {len(dumped):,} characters as JSON;"
                     f" the limit is {limits.max_metadata_chars:,}")
        return False
    return True


def check_messages(problems: Problems, where: str, raw: Any) -> list[dict[str, str]] | None:
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if raw == [] else json_type(raw)
        problems.add(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, not {got}")
        return None
    ok = True
    for i, m in enumerate(raw):
        item = f"'messages'[{i}]"
        if not isinstance(m, dict):
            problems.add(f"{where}: {item} must be an object with 'role' and 'content', not {json_type(m)}")
            ok = False
            continue
        unknown = sorted(set(m) - {"role", "content"})
        if unknown:
            problems.add(f"{where}: {item} has unknown field '{unknown[0]}' (allowed: role, content)")
            ok = False
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            got = "missing" if "role" not in m else f"got {json.dumps(role, ensure_ascii=False)[:40]}"
            problems.add(f"{where}: {item}.role must be one of {', '.join(ROLES)} ({got})")
            ok = False
        if "content" not in m:
            problems.add(f"{where}: {item} is missing 'content'")
            ok = False
        elif not isinstance(content, str):
            problems.add(f"{where}: {item}.content must be a string, not {json_type(content)}")
            ok = False
        elif not check_text_field(problems, where, f"{item}.content", content):
            ok = False
    if ok and raw[-1]["role"] != "user":
        problems.add(f"{where}: the last message must be from the user, not the {raw[-1]['role']}")
        ok = False
    return canonical_messages(raw) if ok else None


def text_prompt(problems: Problems, where: str, prompt: str) -> list[dict[str, str]] | None:
    """A prompt given as text: one user message, or None with its problem recorded."""
    if not check_text_field(problems, where, "'prompt'", prompt):
        return None
    return canonical_messages([{"role": "user", "content": prompt}])


def check_length(problems: Problems, where: str, name: str, messages: list[dict[str, str]],
                  limits: ImportLimits) -> bool:
    chars = sum(len(m["content"]) for m in messages)
    if chars > limits.max_prompt_chars:
        problems.add(f"{where}: {name} is {chars:,} characters long; the limit is {limits.max_prompt_chars:,}")
        return False
    return True


def _provenance(problems: Problems, where: str, obj: dict[str, Any], *, fields: tuple[str, ...], ok: bool,
                limits: ImportLimits) -> tuple[str | None, dict[str, Any]] | None:
    """A JSON record's 'id' and metadata: its 'metadata' object, with every field other
    than `fields`, 'id' and 'metadata' merged in. None, with the problems recorded,
    when either is bad or `ok` (the rest of the record checked out) is false; the
    metadata is only measured when the rest is fine."""
    id_ok, external_id = _external_id(problems, where, obj.get("id"))
    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        problems.add(f"{where}: 'metadata' must be an object, not {json_type(meta)}")
        return None
    meta = {k: v for k, v in obj.items() if k not in (*fields, "id", "metadata")} | meta
    if not (ok and id_ok and _metadata(problems, where, meta, limits)):
        return None
    return external_id, meta


def _record(problems: Problems, where: str, line: int, obj: Any, limits: ImportLimits) -> ParsedPrompt | None:
    """One JSON object -> a prompt, or None with its problems recorded."""
    if not isinstance(obj, dict):
        problems.add(f"{where}: expected an object like {{\"prompt\": \"...\"}}, not {json_type(obj)}")
        return None
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt and has_messages:
        problems.add(f"{where}: give either 'prompt' or 'messages', not both")
        return None
    if not has_prompt and not has_messages:
        problems.add(f"{where}: missing 'prompt' (or 'messages' for a conversation)")
        return None
    ok = True
    if has_prompt:
        name, prompt = "'prompt'", obj["prompt"]
        messages = None
        if not isinstance(prompt, str):
            problems.add(f"{where}: 'prompt' must be a string, not {json_type(prompt)}")
            ok = False
        else:
            messages = text_prompt(problems, where, prompt)
    else:
        name = "'messages'"
        messages = check_messages(problems, where, obj["messages"])
    ok = messages is not None and ok and check_length(problems, where, name, messages, limits)
    provenance = _provenance(problems, where, obj, fields=("prompt", "messages"), ok=ok, limits=limits)
    if provenance is None:
        return None
    assert messages is not None
    external_id, meta = provenance
    return ParsedPrompt(line=line, messages=messages, external_id=external_id, meta=meta)


# ---- formats ---------------------------------------------------------------------

BAD_LINE = object()  # json_line's answer for a line that is not JSON


def json_line(problems: Problems, where: str, line: str) -> Any:
    """One JSONL line's value, or BAD_LINE with the problem recorded."""
    try:
        return load_json(line)
    except json.JSONDecodeError as exc:
        problems.add(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
    except JsonProblem as exc:
        problems.add(f"{where}: not accepted: the JSON {exc}")
    return BAD_LINE


def _jsonl(text: str, problems: Problems, limits: ImportLimits) -> Iterator[ParsedPrompt | None]:
    # split("\n"), not splitlines(): U+2028 and friends may sit inside a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        obj = json_line(problems, where, line)
        yield None if obj is BAD_LINE else _record(problems, where, number, obj, limits)


def _json_array(text: str, problems: Problems, limits: ImportLimits) -> Iterator[ParsedPrompt | None]:
    """A JSON array of prompt objects, decoded item by item so each has its line."""
    ws = " \t\r\n"
    # Line numbers are counted on from the previous item (positions only grow): linear in
    # the file, where counting from the start for every item was quadratic.
    counted = [0, 1]  # position, its line

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def line_of(i: int) -> int:
        position, line = counted
        assert i >= position
        counted[:] = [i, line + text.count("\n", position, i)]
        return counted[1]

    i = skip(0) + 1  # past "["
    while True:
        i = skip(i)
        if i >= len(text):
            problems.add(f"line {line_of(i)}: not valid JSON (the array is not closed with ']')")
            return
        if text[i] == "]":
            break
        line = line_of(i)
        try:
            obj, end = decode_json(text, i)
        except json.JSONDecodeError as exc:
            problems.add(f"line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
            return  # the rest of the array cannot be found reliably
        except JsonProblem as exc:
            problems.add(f"line {line}: not accepted: the JSON {exc}")
            return
        yield _record(problems, f"line {line}", line, obj, limits)
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] != "]":
            problems.add(f"line {line_of(i)}: not valid JSON (expected ',' or ']' between items)")
            return
    if text[skip(i + 1):].strip():
        problems.add(f"line {line_of(skip(i + 1))}: not valid JSON (text after the closing ']')")


def _csv(text: str, problems: Problems, limits: ImportLimits) -> Iterator[ParsedPrompt | None]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    prompt_col = id_col = -1
    last_line = 0
    while True:
        start = last_line + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.add(f"line {reader.line_num}: not valid CSV ({exc})")
            return
        last_line = reader.line_num
        where = f"line {start}"
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            lowered = [h.lower() for h in header]
            ok = True
            for i, h in enumerate(header):
                if not h:
                    problems.add(f"{where}: column {i + 1} of the header has no name")
                    ok = False
                elif lowered.index(h.lower()) != i:
                    problems.add(f"{where}: column '{h}' appears twice in the header")
                    ok = False
            if "prompt" not in lowered:
                found = ", ".join(h for h in header if h) or "nothing"
                problems.add(f"{where}: the header has no 'prompt' column (found: {found})")
                ok = False
            if not ok:
                return
            prompt_col = lowered.index("prompt")
            id_col = lowered.index("id") if "id" in lowered else -1
            continue
        if len(row) != len(header):
            hint = " Is a quote left open?" if any("\n" in c for c in row) else ""
            values = f"{len(row)} value{'s' if len(row) != 1 else ''}"
            problems.add(f"{where}: {values} but the header has {len(header)} columns.{hint}")
            yield None
            continue
        messages = text_prompt(problems, where, row[prompt_col])
        if messages is None or not check_length(problems, where, "'prompt'", messages, limits):
            yield None
            continue
        id_ok, external_id = _external_id(problems, where, row[id_col] if id_col >= 0 else None)
        meta = {h: v for i, (h, v) in enumerate(zip(header, row)) if i not in (prompt_col, id_col)}
        if not (id_ok and _metadata(problems, where, meta, limits)):
            yield None
            continue
        yield ParsedPrompt(line=start, messages=messages, external_id=external_id, meta=meta)
    if header is None:
        problems.add("line 1: the file has no header row")


def parse_prompts(
    data: bytes | str,
    *,
    format: str | None = None,
    filename: str | None = None,
    limits: ImportLimits = LIMITS,
) -> list[ParsedPrompt]:
    """Every prompt of the file, in order. Raises Invalid listing the problems
    (up to limits.max_errors_shown, each with its line and field)."""
    text = decode(data, limits=limits)
    kind = detect_format(text, format=format, filename=filename)
    problems = Problems(limits)
    records = {"jsonl": _jsonl, "json": _json_array, "csv": _csv}[kind](text, problems, limits)
    parsed: list[ParsedPrompt] = []
    seen_ids: dict[str, tuple[int, str]] = {}
    count = 0
    for record in records:
        count += 1
        if count > limits.max_prompts:
            raise fail(f"the file has more than {limits.max_prompts:,} prompts; the limit is"
                        f" {limits.max_prompts:,} per import. Split it into smaller files.")
        if record is None:
            continue
        if record.external_id is not None:
            h = prompt_hash(record.messages)
            first = seen_ids.setdefault(record.external_id, (record.line, h))
            if first[1] != h:
                problems.add(f"line {record.line}: 'id' {record.external_id!r} is already used on line"
                             f" {first[0]} for a different prompt")
                continue
        parsed.append(record)
    problems.raise_if_any()
    if not parsed:
        raise fail("the file has a header but no prompts." if kind == "csv" else "there are no prompts in the file.")
    return parsed


# ---- the use case ----------------------------------------------------------------

def prompt_row(prompt_set: PromptSet, *, messages: list[dict[str, str]], text_hash: str,
               external_id: str | None, meta: dict[str, Any]) -> dict[str, Any]:
    """The row of an imported prompt, its split drawn from its hash."""
    return {
        "prompt_set_id": prompt_set.id, "external_id": external_id, "messages": messages,
        "text": messages[-1]["content"], "text_hash": text_hash, "meta": meta,
        "split": split_for(text_hash, train_ratio=prompt_set.train_ratio,
                           validation_ratio=prompt_set.validation_ratio, rl_ratio=prompt_set.rl_ratio),
    }


def insert_new_prompts(session: Session, rows: Sequence[dict[str, Any]], returning: Any = Prompt.id) -> list[Any]:
    """Insert prompt rows (prompt_row), skipping those already in their set (even against an
    import running at the same moment); the `returning` column of the rows that went in."""
    return insert_new(session, Prompt, rows, conflict=["prompt_set_id", "text_hash"], returning=returning)


def import_prompts(
    session: Session,
    *,
    prompt_set: PromptSet,
    data: bytes | str,
    format: str | None = None,
    filename: str | None = None,
    user_id: int | None = None,
    limits: ImportLimits = LIMITS,
) -> ImportResult:
    """Add the file's prompts to the set in one transaction, skipping exact
    duplicates. Raises Invalid (nothing stored) when any line is bad, Conflict
    for an archived set. An active set gets a generation job for the new prompts."""
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"The prompt set '{prompt_set.name}' is archived; it takes no new prompts.")
    parsed = parse_prompts(data, format=format, filename=filename, limits=limits)
    result = ImportResult()
    rows: dict[str, dict[str, Any]] = {}
    for p in parsed:
        text_hash = prompt_hash(p.messages)
        if text_hash in rows:
            result.duplicates_in_file += 1
            continue
        rows[text_hash] = prompt_row(prompt_set, messages=p.messages, text_hash=text_hash,
                                     external_id=p.external_id, meta=p.meta)
    added = insert_new_prompts(session, list(rows.values()), Prompt.split)
    result.added = len(added)
    result.duplicates_existing = len(rows) - len(added)
    for split in added:
        result.per_split[split.value] += 1
    job = queue_generation_if_needed(session, prompt_set=prompt_set, created_by_id=user_id)
    result.generation_job_id = job.id if job is not None else None
    session.commit()
    return result

