"""Importing existing preference data into a ranking set, as annotations of a named source.

JSONL, one record per line, in any of these shapes (told apart per line, or forced
with `format`):

- TRL preference, plain:          {"prompt": "...", "chosen": "...", "rejected": "..."}
- TRL preference, conversational: {"prompt": [messages], "chosen": [{"role": "assistant",
  "content": "..."}], "rejected": [...]}; without "prompt" (TRL's implicit prompt) the
  conversation both share is the prompt. Our own comparisons export is this format.
- Anthropic HH-RLHF:              {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
  "rejected": "..."}: the turns both transcripts share are the prompt, their last
  assistant turns the two responses.
- ranked or scored responses:     {"prompt": "..." or [messages], "responses": ["...", ...],
  "ranks": [1, 2, 2]} (1 = best) or "scores": [8.5, 6, 6] (higher = better), as
  UltraFeedback-style data: one ranking, ties allowed.

Where the judgements go. Each prompt is stored in the set (an existing one is reused).
Each ranking becomes a task of its own of round 0, -1, -2 ... (imported tasks have
round <= 0; the labeling queue hands out only the set's current round, >= 1, so they
never reach a labeler nor count in a task's overlap), with the responses, and one
annotation of the source with its ratings (Likert 4, "okay", for all: imported data
carries no rating) and the comparisons expanded from the ranks.

Pairs are merged back into rankings: consecutive pair rows of one prompt (and of one
`annotation_id`, when the rows carry one, as our export writes) become one ranking when
their pairs are exactly those of a ranking with ties (`rank_margin`, when given, places
the ranks); otherwise each pair is a ranking of two. Either way the stored comparisons
are the file's pairs, so export -> import -> export gives the same comparisons.
A pair whose two responses are the same text says nothing and is skipped (counted).

All or nothing, memory flat: the file is read line by line and written in batches
(COPY, ids drawn from the sequences first) inside one transaction; the first bad line stops the writing, the rest is still
checked so that the error lists the problems (line and field), and the transaction
is rolled back.
"""

import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.db.enums import PromptSetKind, PromptSetStatus
from app.db.models import Annotation, AnnotationSource, Prompt, PromptSet, Task
from app.services.annotations import NEUTRAL_LIKERT, expand_comparisons
from app.services.errors import Conflict, Invalid
from app.services.prompt_import import (
    BAD_LINE,
    LIMITS,
    ImportLimits,
    Problems,
    check_length,
    check_messages,
    fail,
    insert_new_prompts,
    json_line,
    json_type,
    prompt_row,
    text_prompt,
)
from app.services.prompt_sets import prompt_hash
from app.services.validation import small_int, text_problem

FORMATS = ("auto", "trl", "hh", "ranked")
MAX_K = 9  # responses a task holds
MAX_RESPONSE_CHARS = 50_000
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_SOURCE_CHARS = 100  # annotation_sources.name
BATCH_RANKINGS = 1000  # rankings written per round trip
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass
class Ranking:
    """One judgement to store: a prompt, 2..9 responses and their ranks (1 = best)."""

    line: int
    messages: list[dict[str, str]]
    responses: list[str]
    ranks: list[int]


@dataclass
class _Pair:
    line: int
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: int
    group: Any  # the row's annotation_id, when given: rows of one ranking


@dataclass
class PreferenceImportResult:
    rankings: int = 0
    comparisons: int = 0
    prompts_added: int = 0
    lines: int = 0
    skipped_identical: int = 0
    source: str = ""
    per_format: dict[str, int] = field(default_factory=lambda: {"trl": 0, "hh": 0, "ranked": 0})

    def describe(self) -> str:
        """One sentence for a flash message or a CLI."""
        text_ = (f"Imported {self.comparisons:,} comparison{'s' if self.comparisons != 1 else ''} in"
                 f" {self.rankings:,} ranking{'s' if self.rankings != 1 else ''} from '{self.source}'"
                 f" ({self.prompts_added:,} new prompt{'s' if self.prompts_added != 1 else ''}).")
        if self.skipped_identical:
            text_ += (f" Skipped {self.skipped_identical:,} pair{'s' if self.skipped_identical != 1 else ''}"
                      " whose two responses are the same text.")
        return text_


# ---- reading ---------------------------------------------------------------------

def iter_lines(source: bytes | str | IO[bytes], problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, read one at a time from bytes, text
    or a binary file: a file is never held in memory whole."""
    if isinstance(source, str):
        stream: Iterable[bytes] = io.BytesIO(source.encode("utf-8", "surrogatepass"))
    elif isinstance(source, (bytes, bytearray)):
        stream = io.BytesIO(source)
    else:
        stream = source
    number = 0
    while True:
        raw = stream.readline(MAX_LINE_BYTES + 1)  # type: ignore[union-attr]
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            problems.add(f"line {number}: longer than {MAX_LINE_BYTES:,} bytes; the rest of the file is not read")
            return
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(f"line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1});"
                         " save the file as UTF-8")
            continue
        if line.strip():
            yield number, line


# ---- one record ------------------------------------------------------------------

def _response(problems: Problems, where: str, name: str, raw: Any) -> str | None:
    """A response given as text or as a conversational completion: [{"role": "assistant", ...}]."""
    if isinstance(raw, list):
        if len(raw) != 1 or not isinstance(raw[0], dict) or raw[0].get("role") != "assistant" \
                or not isinstance(raw[0].get("content"), str):
            problems.add(f"{where}: {name} must be a string or one {{\"role\": \"assistant\", \"content\": \"...\"}}"
                         " message")
            return None
        raw = raw[0]["content"]
    if not isinstance(raw, str):
        problems.add(f"{where}: {name} must be a string, not {json_type(raw)}")
        return None
    problem = text_problem(raw)
    if problem is not None:
        problems.add(f"{where}: {name} {problem}")
        return None
    if len(raw) > MAX_RESPONSE_CHARS:
        problems.add(f"{where}: {name} is {len(raw):,} characters long; the limit is {MAX_RESPONSE_CHARS:,}")
        return None
    return raw


def _prompt(problems: Problems, where: str, raw: Any, limits: ImportLimits) -> list[dict[str, str]] | None:
    if isinstance(raw, str):
        messages = text_prompt(problems, where, raw)
    elif isinstance(raw, list):
        messages = check_messages(problems, where, raw)
        if messages is None:
            return None
    else:
        problems.add(f"{where}: 'prompt' must be a string or a list of messages, not {json_type(raw)}")
        return None
    if messages is None or not check_length(problems, where, "'prompt'", messages, limits):
        return None
    return messages


def _hh_turns(problems: Problems, where: str, name: str, raw: Any) -> list[dict[str, str]] | None:
    """An HH-RLHF transcript as messages."""
    if not isinstance(raw, str):
        problems.add(f"{where}: {name} must be a string (an HH-RLHF transcript), not {json_type(raw)}")
        return None
    parts = _HH_TURN.split(raw)
    if parts[0].strip() or len(parts) < 3:
        problems.add(f"{where}: {name} must be a transcript that starts with \"\\n\\nHuman: \"")
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)]


def _split_shared(problems: Problems, where: str, chosen: list[dict[str, str]], rejected: list[dict[str, str]],
                  limits: ImportLimits) -> tuple[list[dict[str, str]], str, str] | None:
    """(prompt, chosen answer, rejected answer) of two conversations that share all but
    their last assistant turn."""
    for name, turns in (("'chosen'", chosen), ("'rejected'", rejected)):
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            problems.add(f"{where}: {name} must end with an assistant turn after the prompt")
            return None
    if chosen[:-1] != rejected[:-1]:
        problems.add(f"{where}: 'chosen' and 'rejected' must share every turn before their last assistant turn")
        return None
    messages = check_messages(problems, where, chosen[:-1])
    if messages is None or not check_length(problems, where, "the prompt", messages, limits):
        return None
    answers = [_response(problems, where, n, t[-1]["content"]) for n, t in (("'chosen'", chosen),
                                                                            ("'rejected'", rejected))]
    if answers[0] is None or answers[1] is None:
        return None
    return messages, answers[0], answers[1]


def _kind(obj: dict[str, Any]) -> str:
    if "responses" in obj:
        return "ranked"
    if "prompt" not in obj and isinstance(obj.get("chosen"), str):
        return "hh"
    return "trl"


def _pair(problems: Problems, where: str, line: int, obj: dict[str, Any], kind: str,
          limits: ImportLimits) -> _Pair | None:
    for name in ("chosen", "rejected"):
        if name not in obj:
            problems.add(f"{where}: missing '{name}'")
            return None
    if kind == "hh":
        turns = [_hh_turns(problems, where, f"'{n}'", obj[n]) for n in ("chosen", "rejected")]
        if turns[0] is None or turns[1] is None:
            return None
        split = _split_shared(problems, where, turns[0], turns[1], limits)
    elif "prompt" not in obj:  # TRL's implicit prompt: two whole conversations
        if not isinstance(obj["chosen"], list) or not isinstance(obj["rejected"], list):
            problems.add(f"{where}: missing 'prompt' (or 'chosen' and 'rejected' as whole conversations)")
            return None
        whole = [check_messages_any(problems, where, f"'{n}'", obj[n]) for n in ("chosen", "rejected")]
        if whole[0] is None or whole[1] is None:
            return None
        split = _split_shared(problems, where, whole[0], whole[1], limits)
    else:
        messages = _prompt(problems, where, obj["prompt"], limits)
        chosen = _response(problems, where, "'chosen'", obj["chosen"])
        rejected = _response(problems, where, "'rejected'", obj["rejected"])
        split = None if messages is None or chosen is None or rejected is None else (messages, chosen, rejected)
    if split is None:
        return None
    margin = 1
    if "rank_margin" in obj:
        margin = small_int(obj["rank_margin"])
        if margin is None or not 1 <= margin < MAX_K:
            problems.add(f"{where}: 'rank_margin' must be a whole number from 1 to {MAX_K - 1}")
            return None
    group = obj.get("annotation_id")
    return _Pair(line, split[0], split[1], split[2], margin, group if isinstance(group, (int, str)) else None)


def check_messages_any(problems: Problems, where: str, name: str, raw: Any) -> list[dict[str, str]] | None:
    """A whole conversation (any last role) as messages; None with the problem recorded."""
    if not raw or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                          and isinstance(m.get("content"), str) for m in raw):
        problems.add(f"{where}: {name} must be a list of {{\"role\", \"content\"}} messages")
        return None
    return [{"role": m["role"], "content": m["content"]} for m in raw]


def _ranked(problems: Problems, where: str, line: int, obj: dict[str, Any], limits: ImportLimits) -> Ranking | None:
    if "prompt" not in obj:
        problems.add(f"{where}: missing 'prompt'")
        return None
    messages = _prompt(problems, where, obj["prompt"], limits)
    raw = obj["responses"]
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_K:
        got = f"{len(raw)} responses" if isinstance(raw, list) else json_type(raw)
        problems.add(f"{where}: 'responses' must be a list of 2 to {MAX_K} responses, not {got}")
        return None
    responses = [_response(problems, where, f"'responses'[{i}]", r) for i, r in enumerate(raw)]
    has_ranks, has_scores = "ranks" in obj, "scores" in obj
    if has_ranks == has_scores:
        problems.add(f"{where}: give either 'ranks' (1 = best) or 'scores' (higher = better)"
                     + (", not both" if has_ranks else ""))
        return None
    name = "ranks" if has_ranks else "scores"
    values = obj[name]
    if not isinstance(values, list) or len(values) != len(raw):
        problems.add(f"{where}: '{name}' must be a list with one value per response ({len(raw)})")
        return None
    ranks: list[int] = []
    if has_ranks:
        for i, v in enumerate(values):
            rank = small_int(v)
            if rank is None or not 1 <= rank <= len(raw):
                problems.add(f"{where}: 'ranks'[{i}] must be a whole number from 1 to {len(raw)}")
                return None
            ranks.append(rank)
    else:
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                problems.add(f"{where}: 'scores'[{i}] must be a number, not {json_type(v)}")
                return None
        distinct = sorted(set(values), reverse=True)
        ranks = [distinct.index(v) + 1 for v in values]  # dense: equal scores tie
    if messages is None or any(r is None for r in responses):
        return None
    texts = [r for r in responses if r is not None]
    if len(set(texts)) != len(texts):
        problems.add(f"{where}: 'responses' holds the same text twice")
        return None
    if len(set(ranks)) == 1:
        problems.add(f"{where}: '{name}' ties every response: the ranking says nothing")
        return None
    return Ranking(line, messages, texts, ranks)


def merge_pairs(pairs: list[_Pair]) -> list[Ranking]:
    """One ranking when the pairs are exactly those of a ranking with ties (and their
    margins its rank differences), else one ranking of two per pair."""
    texts: list[str] = []
    for p in pairs:
        for t in (p.chosen, p.rejected):
            if t not in texts:
                texts.append(t)
    given = {(p.chosen, p.rejected): p.margin for p in pairs}
    if len(texts) <= MAX_K and len(given) == len(pairs):
        rank: dict[str, int] = {}
        # Longest path from the unbeaten responses, each edge as long as its margin.
        for _ in range(len(texts)):
            changed = False
            for t in texts:
                r = max([1] + [rank.get(c, 1) + m for (c, x), m in given.items() if x == t])
                if rank.get(t) != r:
                    rank[t], changed = r, True
            if not changed:
                break
        else:
            rank = {}  # a cycle
        if rank and max(rank.values()) <= MAX_K:
            implied = {(a, b): rank[b] - rank[a] for a in texts for b in texts if rank[a] < rank[b]}
            if implied == given:
                return [Ranking(pairs[0].line, pairs[0].messages, texts, [rank[t] for t in texts])]
    return [Ranking(p.line, p.messages, [p.chosen, p.rejected], [1, 1 + p.margin]) for p in pairs]


def parse_rankings(source: bytes | str | IO[bytes], problems: Problems, *, format: str = "auto",
                   limits: ImportLimits = LIMITS, result: PreferenceImportResult | None = None) -> Iterator[Ranking]:
    """The file's rankings, in order, streamed. Problems are recorded (line and field),
    not raised: the caller decides when to stop."""
    result = result if result is not None else PreferenceImportResult()
    pending: list[_Pair] = []

    def flush() -> Iterator[Ranking]:
        if pending:
            yield from merge_pairs(pending)
            pending.clear()

    for number, line in iter_lines(source, problems):
        result.lines = number
        where = f"line {number}"
        obj = json_line(problems, where, line)
        if obj is BAD_LINE:
            continue
        if not isinstance(obj, dict):
            problems.add(f"{where}: expected an object like {{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}},"
                         f" not {json_type(obj)}")
            continue
        kind = _kind(obj)
        if format != "auto" and kind != format:
            expected = {"trl": "'prompt', 'chosen' and 'rejected'", "hh": "'chosen' and 'rejected' transcripts",
                        "ranked": "'prompt', 'responses' and 'ranks' or 'scores'"}[format]
            problems.add(f"{where}: not the {format} format: expected {expected}")
            continue
        if kind == "ranked":
            ranking = _ranked(problems, where, number, obj, limits)
            if ranking is not None:
                result.per_format[kind] += 1
                yield from flush()
                yield ranking
            continue
        pair = _pair(problems, where, number, obj, kind, limits)
        if pair is None:
            continue
        result.per_format[kind] += 1
        if pair.chosen == pair.rejected:
            result.skipped_identical += 1
            continue
        if pending and (pending[0].messages != pair.messages or pending[0].group != pair.group
                        or len(pending) >= MAX_K * (MAX_K - 1) // 2):
            yield from flush()
        pending.append(pair)
    yield from flush()


# ---- the use case ----------------------------------------------------------------

def clean_source_name(raw: Any) -> str:
    name = raw.strip() if isinstance(raw, str) else ""
    if not name:
        raise Invalid("Name the source of the data (for example hh-rlhf).",
                      errors={"source": "name the source of the data, e.g. hh-rlhf"})
    if len(name) > MAX_SOURCE_CHARS or text_problem(name):
        raise Invalid(f"The source name must be at most {MAX_SOURCE_CHARS} characters of text.",
                      errors={"source": f"at most {MAX_SOURCE_CHARS} characters of text"})
    return name


def get_or_create_source(session: Session, name: str, *, user_id: int | None) -> AnnotationSource:
    source = session.scalar(select(AnnotationSource).where(AnnotationSource.name == name))
    if source is None:
        source = AnnotationSource(name=name, created_by_id=user_id)
        session.add(source)
        session.flush()
    return source


def list_sources(session: Session, prompt_set_id: int) -> list[tuple[AnnotationSource, int]]:
    """The sources with annotations in the set, and how many."""
    rows = session.execute(
        select(AnnotationSource, func.count(Annotation.id))
        .join(Annotation, Annotation.source_id == AnnotationSource.id)
        .join(Task, Task.id == Annotation.task_id)
        .where(Task.prompt_set_id == prompt_set_id)
        .group_by(AnnotationSource.id).order_by(AnnotationSource.name)
    ).all()
    return [(s, n) for s, n in rows]


def _ids(cur: Any, table: str, n: int) -> list[int]:
    """n fresh ids of the table's sequence, for rows written with COPY."""
    cur.execute(f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, %s)", (n,))
    return [row[0] for row in cur.fetchall()]


def _copy(cur: Any, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    if rows:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def _write(session: Session, prompt_set: PromptSet, source_id: int, batch: list[Ranking],
           result: PreferenceImportResult) -> None:
    """Store a batch of rankings: prompts (INSERT ... ON CONFLICT, an existing prompt is
    reused), then tasks, responses, annotations, ratings and comparisons with COPY."""
    hashes = [prompt_hash(r.messages) for r in batch]
    rows = {h: prompt_row(prompt_set, messages=r.messages, text_hash=h, external_id=None, meta={})
            for h, r in zip(hashes, batch, strict=True)}
    result.prompts_added += len(insert_new_prompts(session, list(rows.values())))
    prompt_ids = dict(session.execute(select(Prompt.text_hash, Prompt.id).where(
        Prompt.prompt_set_id == prompt_set.id, Prompt.text_hash.in_(list(rows)))).all())
    # Imported tasks take rounds 0, -1, -2 ... of their prompt.
    lowest = dict(session.execute(select(Task.prompt_id, func.min(Task.round)).where(
        Task.prompt_id.in_(list(prompt_ids.values())), Task.round <= 0).group_by(Task.prompt_id)).all())
    cur = session.connection().connection.driver_connection.cursor()
    n_responses = sum(len(r.responses) for r in batch)
    task_ids, annotation_ids = _ids(cur, "tasks", len(batch)), _ids(cur, "annotations", len(batch))
    response_ids = iter(_ids(cur, "responses", n_responses))
    tasks, responses, links, annotations_, ratings, comparisons = [], [], [], [], [], []
    for h, r, task_id, annotation_id in zip(hashes, batch, task_ids, annotation_ids, strict=True):
        pid = prompt_ids[h]
        round_ = lowest.get(pid, 1) - 1
        lowest[pid] = round_
        tasks.append((task_id, prompt_set.id, pid, round_, len(r.responses)))
        annotations_.append((annotation_id, task_id, source_id, 0.0))
        ids = [next(response_ids) for _ in r.responses]
        for position, (rid, response, rank) in enumerate(zip(ids, r.responses, r.ranks, strict=True)):
            responses.append((rid, pid, round_, position, response, 0, "imported"))
            links.append((task_id, rid, position))
            ratings.append((annotation_id, task_id, rid, NEUTRAL_LIKERT, rank))
        for pair in expand_comparisons(dict.fromkeys(ids, NEUTRAL_LIKERT), dict(zip(ids, r.ranks, strict=True))):
            comparisons.append((annotation_id, task_id, pair.chosen, pair.rejected, pair.rank_margin,
                                pair.rating_margin))
    _copy(cur, "tasks", ("id", "prompt_set_id", "prompt_id", "round", "k"), tasks)
    _copy(cur, "responses", ("id", "prompt_id", "round", "sample_index", "text", "num_tokens",
                                   "finish_reason"), responses)
    _copy(cur, "task_responses", ("task_id", "response_id", "position"), links)
    _copy(cur, "annotations", ("id", "task_id", "source_id", "time_spent_s"), annotations_)
    _copy(cur, "ratings", ("annotation_id", "task_id", "response_id", "likert", "rank"), ratings)
    _copy(cur, "comparisons", ("annotation_id", "task_id", "chosen_response_id", "rejected_response_id",
                               "rank_margin", "rating_margin"), comparisons)
    result.rankings += len(batch)
    result.comparisons += len(comparisons)


def import_preferences(
    session: Session,
    *,
    prompt_set: PromptSet,
    source: bytes | str | IO[bytes],
    source_name: Any,
    format: str | None = "auto",
    user_id: int | None = None,
    limits: ImportLimits = LIMITS,
    progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH_RANKINGS,
) -> PreferenceImportResult:
    """Store the file's judgements as annotations of the named source, in one
    transaction. Raises Invalid (nothing stored) naming each bad line and field,
    Conflict for an archived set or one that is not a ranking set. `progress` is
    called with the number of lines read after each batch."""
    fmt = format or "auto"
    if fmt not in FORMATS:
        raise Invalid(f"Unknown format '{fmt}'; choose one of {', '.join(FORMATS)}.",
                      errors={"format": f"must be one of {', '.join(FORMATS)}"})
    name = clean_source_name(source_name)
    if prompt_set.kind != PromptSetKind.ranking:
        raise Conflict(f"The prompt set '{prompt_set.name}' is not a ranking set; preferences go into ranking sets.")
    if prompt_set.status == PromptSetStatus.archived:
        raise Conflict(f"The prompt set '{prompt_set.name}' is archived; it takes no new data.")
    result = PreferenceImportResult(source=name)
    problems = Problems(limits)
    try:
        # One import into a set at a time: imported tasks number their rounds from what is stored.
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext('preference_import'), :id)"),
                        {"id": prompt_set.id})
        source_row = get_or_create_source(session, name, user_id=user_id)
        batch: list[Ranking] = []
        for ranking in parse_rankings(source, problems, format=fmt, limits=limits, result=result):
            if problems.total:
                continue  # nothing more is written; the rest is only checked
            batch.append(ranking)
            if len(batch) >= batch_size:
                _write(session, prompt_set, source_row.id, batch, result)
                batch.clear()
                if progress is not None:
                    progress(result.lines)
        problems.raise_if_any()
        if batch:
            _write(session, prompt_set, source_row.id, batch, result)
        if not result.rankings:
            raise fail("there are no preferences in the file"
                       + (" (every pair had two identical responses)." if result.skipped_identical else "."))
    except BaseException:
        session.rollback()
        raise
    session.commit()
    if progress is not None:
        progress(result.lines)
    return result
