"""Test data, one factory per thing, by area:
- users: accounts (`make_user`, `TEST_PASSWORD`);
- prompt_sets: prompt sets, prompts and ranking tasks (`make_prompt_set`,
  `demo_set`, `create_set`, `add_prompt`, `make_task`, `task_with_ids`);
- demonstrations: a writer's lease and submit (`lease_demo`, `submit_demo`, `LEASE_S`);
- models: registered models (`make_model`);
- quality: annotations (`annotate`) and bulk-seeded labeled sets (`bulk_seed`);
- training: a set ranked by the synthetic rule (`ranked_set`), a small demonstration set (`demonstration_set`);
- evaluation: evaluation sets with responses and scheduled A/B tasks (`make_evaluation`);
- synthetic: data with a known rule for the trainer's learning tests (no database).
Tests import them from here: `from tests.factories import make_prompt_set, make_task`.
"""

from tests.factories.demonstrations import LEASE_S, lease_demo, submit_demo
from tests.factories.evaluation import make_evaluation
from tests.factories.models import make_model
from tests.factories.prompt_sets import (
    add_prompt,
    create_set,
    demo_set,
    make_prompt_set,
    make_task,
    response_ids,
    task_with_ids,
)
from tests.factories.quality import annotate, bulk_seed, bulk_seed_session
from tests.factories.training import demonstration_set, ranked_set
from tests.factories.users import TEST_PASSWORD, make_user

__all__ = [
    "LEASE_S", "TEST_PASSWORD", "add_prompt", "annotate", "bulk_seed", "bulk_seed_session", "create_set", "demo_set",
    "demonstration_set", "lease_demo", "make_evaluation", "make_model", "make_prompt_set", "make_task", "make_user", "ranked_set", "response_ids",
    "submit_demo", "task_with_ids",
]
