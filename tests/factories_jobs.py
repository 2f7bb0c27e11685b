"""Small factories for job and generation tests: prompt sets, prompts and models
written with the ORM (the prompt-set services belong to another area)."""

import hashlib
import json
from pathlib import Path

from sqlalchemy.orm import Session

from app.db.enums import ModelKind, PromptSetStatus, Split
from app.db.models import Model, Prompt, PromptSet

_n = iter(range(1, 10**9))


def make_model(session: Session, path: Path | str, *, name: str | None = None, kind: ModelKind = ModelKind.sft,
               is_default: bool = False) -> Model:
    model = Model(name=name or f"model-{next(_n)}", kind=kind, path=str(path), source="test",
                  is_default=is_default)
    session.add(model)
    session.flush()
    return model


def make_prompt_set(session: Session, *, model: Model | None = None, prompts: list[str] = (), k: int = 2,
                    seed: int = 0, max_new_tokens: int = 12, status: PromptSetStatus = PromptSetStatus.active,
                    name: str | None = None, **values) -> PromptSet:
    prompt_set = PromptSet(name=name or f"set-{next(_n)}", k=k, seed=seed, max_new_tokens=max_new_tokens,
                           generator_model_id=model.id if model else None, status=status, **values)
    session.add(prompt_set)
    session.flush()
    for text in prompts:
        add_prompt(session, prompt_set, text)
    return prompt_set


def add_prompt(session: Session, prompt_set: PromptSet, text: str) -> Prompt:
    messages = [{"role": "user", "content": text}]
    prompt = Prompt(prompt_set_id=prompt_set.id, messages=messages, text=text,
                    text_hash=hashlib.sha256(json.dumps(messages).encode()).hexdigest(), split=Split.train)
    session.add(prompt)
    session.flush()
    return prompt
