"""A ranking set labeled by the synthetic rule of tests/factories/synthetic.py (more GOOD is
better), in the database: what the reward-model and PPO jobs read; and a small demonstration
set, what an SFT run reads."""

import json

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.enums import PromptSetKind, Split
from app.db.models import PromptSet, User
from app.services import demonstrations as demos
from tests.factories import synthetic
from tests.factories.prompt_sets import add_prompt, make_prompt_set, make_task, response_ids
from tests.factories.quality import annotate


def ranked_set(session: Session, labeler: User, *, prompts: int = 24, k: int = 4, seed: int = 0,
               name: str | None = None) -> PromptSet:
    """`prompts` prompts with K synthetic responses each, one ranking per prompt by
    `labeler`; every 5th prompt is in the validation split, every 5th after that in rl."""
    prompt_set = make_prompt_set(session, name=name, k=k)
    for index, group in enumerate(synthetic.ranked_groups(range(prompts), k=k, seed=seed)):
        split = Split.validation if index % 5 == 0 else Split.rl if index % 5 == 1 else Split.train
        task = make_task(session, prompt_set, texts=group.responses, messages=group.messages, split=split)
        annotate(session, task, response_ids(task), labeler, group.ranks)
    session.flush()
    return prompt_set


def demonstration_set(session: Session, author: User, *, prompts: int = 3, validation: int = 0,
                      question: str = "Question {i}?", answer: str = "Answer {i}.") -> PromptSet:
    """A demonstration set of `prompts` questions (`question` formatted with i), the last
    `validation` of them in the validation split, each answered (`answer`) by `author` through
    the import (committed)."""
    prompt_set = make_prompt_set(session, kind=PromptSetKind.demonstration)
    for i in range(prompts):
        add_prompt(session, prompt_set, question.format(i=i),
                   split=Split.validation if i >= prompts - validation else Split.train)
    session.commit()
    lines = [json.dumps({"prompt": question.format(i=i), "response": answer.format(i=i)}) for i in range(prompts)]
    demos.import_demonstrations(session, prompt_set=prompt_set, user=author, now=utcnow(), data="\n".join(lines))
    return prompt_set
