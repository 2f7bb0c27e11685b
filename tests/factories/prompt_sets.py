"""Prompt sets, prompts and ranking tasks, made directly through the ORM (or, with
`create_set`, through the prompt-set service as the admin's form does).

make_task builds what the generation worker would: a prompt, K responses, the
task and its task_responses in a shuffled display order (seeded, so tests can
rely on it).
"""

import hashlib
import itertools
import json
import random
from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.orm import Session

from app.db.enums import PromptSetKind, PromptSetStatus, Split
from app.db.models import Model, Prompt, PromptSet, PromptSetLabeler, Response, Task, TaskResponse, User
from app.services import prompt_sets
from app.services.prompt_sets import prompt_hash

_counter = itertools.count(1)


def make_prompt_set(session: Session, *, name: str | None = None, k: int = 4, overlap: int = 1,
                    status: PromptSetStatus = PromptSetStatus.active, kind: PromptSetKind = PromptSetKind.ranking,
                    allowed: list[User] | None = None, model: Model | None = None, prompts: Iterable[str] = (),
                    **values) -> PromptSet:
    """An (active, by default) ranking set; `allowed` lists its only labelers (None: open to all),
    `model` is its generator, `prompts` its first prompts; `values` sets other columns."""
    prompt_set = PromptSet(name=name or f"set-{next(_counter)}", k=k, overlap=overlap, status=status, kind=kind,
                           generator_model_id=model.id if model else None, **values)
    session.add(prompt_set)
    session.flush()
    for user in allowed or []:
        session.add(PromptSetLabeler(prompt_set_id=prompt_set.id, user_id=user.id))
    session.flush()
    for text in prompts:
        add_prompt(session, prompt_set, text)
    return prompt_set


def demo_set(session: Session, *, overlap: int = 1, status: PromptSetStatus = PromptSetStatus.active,
             allowed: list[User] | None = None, name: str | None = None) -> PromptSet:
    """A demonstration set (with instructions in Markdown)."""
    return make_prompt_set(session, kind=PromptSetKind.demonstration, overlap=overlap, status=status,
                           allowed=allowed, name=name, instructions="Answer **kindly**.")


def create_set(session: Session, **settings) -> PromptSet:
    """A set made through the prompt-set service, as the admin's form makes it (a draft)."""
    return prompt_sets.create_prompt_set(session, name=f"set-{next(_counter)}", **settings)


def add_prompt(session: Session, prompt_set: PromptSet, text: str, split: Split = Split.train,
               messages: list[dict[str, str]] | None = None) -> Prompt:
    """A prompt of the set: `text` as one user message, or `messages`."""
    messages = messages or [{"role": "user", "content": text}]
    prompt = Prompt(prompt_set_id=prompt_set.id, messages=messages, text=messages[-1]["content"],
                    text_hash=prompt_hash(messages), split=split)
    session.add(prompt)
    session.flush()
    return prompt


def make_task(session: Session, prompt_set: PromptSet, *, k: int | None = None,
              texts: list[str] | None = None, messages: list[dict[str, str]] | None = None,
              is_gold: bool = False, shuffle: bool = True, shuffle_seed: int | None = None, num_labels: int = 0,
              created_at: datetime | None = None, split: Split = Split.train) -> Task:
    """A prompt ('question n' unless `messages`) with K responses (`texts`, or 'answer i
    to n') and its task, the responses shown in a shuffled order (in sample order when
    not `shuffle`). A gold task's gold ranking is the sample order. Returns the task;
    task.items are in display order (A, B, C...)."""
    n = next(_counter)
    k = len(texts) if texts is not None else (k or prompt_set.k)
    texts = texts if texts is not None else [f"answer {i} to {n}" for i in range(k)]
    messages = messages or [{"role": "user", "content": f"question {n}"}]
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
    if shuffle:
        random.Random(n if shuffle_seed is None else shuffle_seed).shuffle(positions)
    session.add_all(
        TaskResponse(task_id=task.id, response_id=r.id, position=p) for r, p in zip(responses, positions)
    )
    session.flush()
    session.refresh(task, ["items"])
    return task


def response_ids(task: Task) -> list[int]:
    """The task's response ids in sample order (answer 0, answer 1...): ids are inserted in order."""
    return sorted(item.response_id for item in task.items)


def task_with_ids(session: Session, prompt_set: PromptSet, **values) -> tuple[Task, list[int]]:
    """make_task, and its response ids in sample order."""
    task = make_task(session, prompt_set, **values)
    return task, response_ids(task)
