"""Small factories for prompt sets and tasks, made directly through the ORM.

make_task builds what the generation worker would: a prompt, K responses, the
task and its task_responses in a shuffled display order (seeded, so tests can
rely on it).
"""

import hashlib
import itertools
import json
import random
from datetime import datetime

from sqlalchemy.orm import Session

from app.db.enums import PromptSetKind, PromptSetStatus, Split
from app.db.models import Prompt, PromptSet, PromptSetLabeler, Response, Task, TaskResponse, User

_counter = itertools.count(1)


def make_prompt_set(session: Session, *, name: str | None = None, k: int = 4, overlap: int = 1,
                    status: PromptSetStatus = PromptSetStatus.active, instructions: str = "",
                    gold_rate: float = 0.0, kind: PromptSetKind = PromptSetKind.ranking,
                    allowed: list[User] | None = None) -> PromptSet:
    """An (active, by default) ranking set; `allowed` lists its only labelers (None: open to all)."""
    prompt_set = PromptSet(name=name or f"set-{next(_counter)}", k=k, overlap=overlap, status=status,
                           instructions=instructions, gold_rate=gold_rate, kind=kind)
    session.add(prompt_set)
    session.flush()
    for user in allowed or []:
        session.add(PromptSetLabeler(prompt_set_id=prompt_set.id, user_id=user.id))
    session.flush()
    return prompt_set


def make_task(session: Session, prompt_set: PromptSet, *, k: int | None = None,
              texts: list[str] | None = None, messages: list[dict[str, str]] | None = None,
              is_gold: bool = False, shuffle_seed: int | None = None, num_labels: int = 0,
              created_at: datetime | None = None, split: Split = Split.train) -> Task:
    """A prompt with K responses (`texts`, or 'Response i to prompt n') and its task,
    the responses shown in a shuffled order. Returns the task; task.items are in
    display order (A, B, C...)."""
    n = next(_counter)
    k = len(texts) if texts is not None else (k or prompt_set.k)
    texts = texts if texts is not None else [f"Response {i} to prompt {n}." for i in range(k)]
    messages = messages or [{"role": "user", "content": f"Prompt number {n}: say something useful."}]
    text_hash = hashlib.sha256(json.dumps([messages, n]).encode()).hexdigest()
    prompt = Prompt(prompt_set_id=prompt_set.id, messages=messages, text=messages[-1]["content"],
                    text_hash=text_hash, split=split)
    session.add(prompt)
    session.flush()
    responses = [
        Response(prompt_id=prompt.id, round=prompt_set.round, sample_index=i, text=t, num_tokens=len(t.split()))
        for i, t in enumerate(texts)
    ]
    session.add_all(responses)
    session.flush()
    task = Task(prompt_set_id=prompt_set.id, prompt_id=prompt.id, round=prompt_set.round, k=k,
                is_gold=is_gold, num_labels=num_labels,
                gold_ranking={str(r.id): i + 1 for i, r in enumerate(responses)} if is_gold else None)
    if created_at is not None:
        task.created_at = created_at
    session.add(task)
    session.flush()
    positions = list(range(k))
    random.Random(n if shuffle_seed is None else shuffle_seed).shuffle(positions)
    session.add_all(
        TaskResponse(task_id=task.id, response_id=r.id, position=p) for r, p in zip(responses, positions)
    )
    session.flush()
    session.refresh(task, ["items"])
    return task
