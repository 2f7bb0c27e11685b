"""Labeled prompt sets for the quality, export and progress tests, and the benchmark.

Two ways in:
- `annotate`, on sets and tasks of tests/factories/prompt_sets.py (`task_with_ids`):
  a handful of rows through the ORM, for hand-made data whose right answers are known;
- `bulk_seed`: thousands of tasks, annotations, ratings and comparisons with
  COPY, for streaming tests and bench/agreement.py. Each labeler either follows
  a hidden true order (with a little noise) or ranks at random.
"""

import json
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.enums import Split
from app.db.models import Annotation, Comparison, Rating, Task
from app.services.annotations import expand_comparisons


def comparisons_of(ids: list[int], ranks: list[int], likerts: list[int]) -> list[tuple[int, int, int, int]]:
    """(chosen, rejected, rank margin, rating margin) for every strictly ordered pair,
    by the labeling service's own rule."""
    pairs = expand_comparisons(dict(zip(ids, likerts)), dict(zip(ids, ranks)))
    return [(p.chosen, p.rejected, p.rank_margin, p.rating_margin) for p in pairs]


def annotate(session: Session, task: Task, ids: list[int], user, ranks: list[int],
             likerts: list[int] | None = None, *, time_s: float = 10.0, flags: list[str] | None = None,
             excluded: bool = False, created_at: datetime | None = None) -> Annotation:
    """A submitted annotation with its ratings and comparisons; bumps the task's label count."""
    likerts = likerts or [max(1, 8 - r) for r in ranks]
    when = created_at or utcnow()
    annotation = Annotation(task_id=task.id, user_id=user.id, time_spent_s=time_s, excluded=excluded,
                            prompt_flags=flags or [], created_at=when, updated_at=when)
    session.add(annotation)
    session.flush()
    session.add_all(Rating(annotation_id=annotation.id, task_id=task.id, response_id=rid, likert=lk, rank=rk)
                    for rid, rk, lk in zip(ids, ranks, likerts))
    session.add_all(Comparison(annotation_id=annotation.id, task_id=task.id, chosen_response_id=c,
                               rejected_response_id=r, rank_margin=rm, rating_margin=lm, created_at=when)
                    for c, r, rm, lm in comparisons_of(ids, ranks, likerts))
    task.num_labels += 1
    session.flush()
    return annotation


# ---- bulk ------------------------------------------------------------------------

@dataclass
class BulkCounts:
    tasks: int = 0
    annotations: int = 0
    ratings: int = 0
    comparisons: int = 0


def _next_ids(cur, table: str, n: int) -> int:
    """Reserve n ids of table's sequence; returns the first."""
    cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce((SELECT max(id) FROM {table}), 0) + %s)", (n,))
    last = cur.fetchone()[0]
    return last - n + 1


def bulk_seed(dbapi_connection, *, prompt_set_id: int, labelers: dict[int, str], tasks: int, k: int = 4,
              overlap: int = 3, seed: int = 0, start: datetime | None = None, span_h: float = 48.0,
              split_of=lambda i: Split.train) -> BulkCounts:
    """COPY `tasks` tasks of k responses into the set, each labeled by `overlap`
    labelers (taken in turn from `labelers`: {user_id: "consistent" | "random"}),
    with ratings and comparisons, created over `span_h` hours before `start`.
    dbapi_connection is a psycopg connection (inside the caller's transaction)."""
    rng = random.Random(seed)
    start = start or utcnow()
    users = list(labelers)
    overlap = min(overlap, len(users))
    n_ann = tasks * overlap
    cur = dbapi_connection.cursor()
    prompt0 = _next_ids(cur, "prompts", tasks)
    response0 = _next_ids(cur, "responses", tasks * k)
    task0 = _next_ids(cur, "tasks", tasks)
    annotation0 = _next_ids(cur, "annotations", n_ann)
    rating0 = _next_ids(cur, "ratings", n_ann * k)
    comparison0 = _next_ids(cur, "comparisons", n_ann * k * (k - 1) // 2)
    counts = BulkCounts(tasks=tasks)
    prompts, responses, task_rows, task_responses = [], [], [], []
    annotations, ratings, comparisons = [], [], []
    for t in range(tasks):
        prompt_id, task_id = prompt0 + t, task0 + t
        content = f"bulk question {prompt_set_id}-{t}"
        prompts.append((prompt_id, prompt_set_id, json.dumps([{"role": "user", "content": content}]), content,
                        f"{prompt_set_id:016x}{t:048x}", Split(split_of(t)).value))
        ids = [response0 + t * k + i for i in range(k)]
        for i, rid in enumerate(ids):
            responses.append((rid, prompt_id, 1, i, f"bulk answer {i} to {t}", 4, "eos"))
            task_responses.append((task_id, rid, i))
        task_rows.append((task_id, prompt_set_id, prompt_id, 1, k, overlap))
        truth = [rng.random() for _ in range(k)]
        for j in range(overlap):
            user_id = users[(t + j) % len(users)]
            if labelers[user_id] == "random":
                scores = [rng.random() for _ in range(k)]
            else:
                scores = [s + rng.gauss(0, 0.1) for s in truth]
            order = sorted(range(k), key=lambda i: -scores[i])
            ranks = [order.index(i) + 1 for i in range(k)]
            likerts = [max(1, min(7, 8 - r - (r > 1) + rng.choice((-1, 0, 0, 1)))) for r in ranks]
            annotation_id = annotation0 + counts.annotations
            when = start - timedelta(hours=rng.random() * span_h)
            annotations.append((annotation_id, task_id, user_id, round(rng.uniform(5, 120), 1), when, when))
            counts.annotations += 1
            for rid, rank, likert in zip(ids, ranks, likerts):
                ratings.append((rating0 + counts.ratings, annotation_id, task_id, rid, likert, rank))
                counts.ratings += 1
            for c, r, rm, lm in comparisons_of(ids, ranks, likerts):
                comparisons.append((comparison0 + counts.comparisons, annotation_id, task_id, c, r, rm, lm, when))
                counts.comparisons += 1
    copies = [
        ("prompts (id, prompt_set_id, messages, text, text_hash, split)", prompts),
        ("responses (id, prompt_id, round, sample_index, text, num_tokens, finish_reason)", responses),
        ("tasks (id, prompt_set_id, prompt_id, round, k, num_labels)", task_rows),
        ("task_responses (task_id, response_id, position)", task_responses),
        ("annotations (id, task_id, user_id, time_spent_s, created_at, updated_at)", annotations),
        ("ratings (id, annotation_id, task_id, response_id, likert, rank)", ratings),
        ("comparisons (id, annotation_id, task_id, chosen_response_id, rejected_response_id,"
         " rank_margin, rating_margin, created_at)", comparisons),
    ]
    for target, rows in copies:
        with cur.copy(f"COPY {target} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    cur.close()
    return counts


def bulk_seed_session(session: Session, **kwargs) -> BulkCounts:
    """bulk_seed on the session's own connection (and transaction)."""
    session.flush()
    return bulk_seed(session.connection().connection.driver_connection, **kwargs)
