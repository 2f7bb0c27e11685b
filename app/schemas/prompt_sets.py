"""Schemas of prompt sets for the JSON API and the HTML forms.

Types only: the ranges (K 2..9, ratios adding up to 1...) are checked once, in
app.services.prompt_sets, so the API and the pages answer with the same messages.
"""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.db.enums import JobStatus, PromptSetKind, PromptSetStatus, TaskOrder
from app.db.models import Job, PromptSet
from app.schemas.common import Id, Text
from app.services.prompt_sets import DEFAULTS, MAX_BEST_OF_N, PromptSetCounts

BEST_OF_N_HELP = (f"Ranking sets: generate rounds as the best K of N samples per prompt by a reward model "
                  f"(K < N <= {MAX_BEST_OF_N}); null: the K samples themselves.")
BEST_OF_N_REWARD_HELP = "The reward model scoring best-of-N rounds; unset: the default reward model."


class PromptSetCreate(BaseModel):
    name: Text = Field(max_length=1000)
    instructions: Text = Field(default="", description="Markdown shown to labelers.")
    generator_model_id: Id | None = Field(
        default=None, description="An SFT or policy model; unset: the default model.")
    k: int = Field(default=DEFAULTS["k"], description="Responses per prompt, 2..9.")
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    seed: int = DEFAULTS["seed"]
    overlap: int = Field(default=DEFAULTS["overlap"], description="Labelers per task.")
    train_ratio: float = DEFAULTS["train_ratio"]
    validation_ratio: float = DEFAULTS["validation_ratio"]
    rl_ratio: float = DEFAULTS["rl_ratio"]
    kind: PromptSetKind = PromptSetKind.ranking
    pairwise: bool = Field(default=False, description="K = 2 only: labeled on the A/B page (votes).")
    model_ids: list[Id] = Field(default_factory=list, max_length=20,
                                description="Kind evaluation: the models compared (two or more).")
    source_set_ids: list[Id] = Field(default_factory=list, max_length=100, description=(
        "Kind evaluation: ranking sets whose validation prompts the evaluation takes."))
    top_k: int | None = Field(default=None, description="Partial rankings: labelers rank only the best top_k "
                                                        "responses (1 <= top_k < K), the rest tied last; null: all.")
    best_of_n: int | None = Field(default=None, description=BEST_OF_N_HELP)
    best_of_n_reward_model_id: Id | None = Field(default=None, description=BEST_OF_N_REWARD_HELP)


class PromptSetUpdate(BaseModel):
    """Only the fields sent are changed."""

    name: Text | None = Field(default=None, max_length=1000)
    instructions: Text | None = None
    generator_model_id: Id | None = None
    k: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    overlap: int | None = None
    train_ratio: float | None = None
    validation_ratio: float | None = None
    rl_ratio: float | None = None
    pairwise: bool | None = None
    top_k: int | None = Field(default=None, description="null: rank every response.")
    best_of_n: int | None = Field(default=None, description=BEST_OF_N_HELP)
    best_of_n_reward_model_id: Id | None = Field(default=None, description=BEST_OF_N_REWARD_HELP)


class PromptSetForm(BaseModel):
    """The create/edit form as the browser sends it: every value a string,
    checked by the service so bad values come back next to their fields."""

    name: str = ""
    instructions: str = ""
    generator_model_id: str = ""
    k: str = str(DEFAULTS["k"])
    temperature: str = str(DEFAULTS["temperature"])
    top_p: str = str(DEFAULTS["top_p"])
    max_new_tokens: str = str(DEFAULTS["max_new_tokens"])
    seed: str = str(DEFAULTS["seed"])
    overlap: str = str(DEFAULTS["overlap"])
    train_ratio: str = str(DEFAULTS["train_ratio"])
    validation_ratio: str = str(DEFAULTS["validation_ratio"])
    rl_ratio: str = str(DEFAULTS["rl_ratio"])
    kind: str = PromptSetKind.ranking.value
    pairwise: str = ""
    top_k: str = ""
    best_of_n: str = ""
    best_of_n_reward_model_id: str = ""


class PromptSetCountsOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    prompts: int
    responses: int
    tasks: int
    tasks_ready: int
    tasks_labeled: int
    prompts_per_split: dict[str, int]
    tasks_per_split: dict[str, int]


class JobBrief(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    status: JobStatus
    progress_done: int
    progress_total: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class PromptSetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    kind: PromptSetKind
    status: PromptSetStatus
    instructions: str
    generator_model_id: int | None
    k: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    overlap: int
    train_ratio: float
    validation_ratio: float
    rl_ratio: float
    pairwise: bool
    top_k: int | None
    task_order: TaskOrder
    order_model_id: int | None
    best_of_n: int | None
    best_of_n_reward_model_id: int | None
    round: int
    created_by_id: int | None
    created_at: datetime
    counts: PromptSetCountsOut | None = None
    generation_job: JobBrief | None = None


def prompt_set_out(prompt_set: PromptSet, counts: PromptSetCounts, generation_job: Job | None) -> PromptSetOut:
    return PromptSetOut.model_validate(prompt_set).model_copy(update={
        "counts": PromptSetCountsOut.model_validate(counts),
        "generation_job": JobBrief.model_validate(generation_job) if generation_job else None,
    })


class PromptImportBody(BaseModel):
    format: Literal["auto", "jsonl", "json", "csv"] = Field(
        default="auto", description="auto: JSON when the text starts with { or [, else CSV.")
    content: str = Field(description="The JSONL, JSON array or CSV text.")


class PreferenceImportBody(BaseModel):
    source: str = Field(max_length=100, description="Where the judgements come from, e.g. hh-rlhf.")
    format: Literal["auto", "trl", "hh", "ranked"] = Field(
        default="auto", description="auto: told apart per line by its fields.")
    content: str = Field(description="The JSONL text.")


class PreferenceImportResultOut(BaseModel):
    source: str
    rankings: int
    comparisons: int
    prompts_added: int
    skipped_identical: int
    per_format: dict[str, int]


class ImportResultOut(BaseModel):
    added: int
    duplicates: int
    duplicates_in_file: int
    duplicates_existing: int
    per_split: dict[str, int]
    generation_job_id: int | None


class AISettingsIn(BaseModel):
    """A ranking set's AI feedback settings."""

    model_config = ConfigDict(extra="forbid")

    principles: Text = Field(default="", description="What an AI labeler's judge model compares responses by "
                                                     "(one principle a line), after the set's instructions.")
    pre_annotator_id: Id | None = Field(default=None, description=(
        "An AI labeler whose ranking is pre-filled for labelers on a random half of the tasks; null: off."))


class AISettingsOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    principles: str
    pre_annotator_id: int | None


class AILabelRunIn(BaseModel):
    """An AI labeler ranks the set's current-round tasks: those it has not ranked ("missing"), or "all"."""

    model_config = ConfigDict(extra="forbid")

    ai_user_id: Id
    scope: Literal["missing", "all"] = "missing"
class TaskOrderBody(BaseModel):
    task_order: TaskOrder | str = Field(description="created: oldest first; uncertainty: the tasks the reward "
                                                    "model separates least confidently first.")
    order_model_id: Id | None = Field(default=None, description="A reward model; null: the newest one.")


class TaskScoreOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    task_id: int
    prompt: str
    margin: float = Field(description="Mean |reward gap| over the task's pairs of responses.")
    num_labels: int
    model_name: str


class TaskOrderOut(BaseModel):
    prompt_set_id: int
    task_order: TaskOrder
    order_model_id: int | None
    scoring_model_id: int | None = Field(description="The model that scores the tasks now (chosen or newest).")
    open_tasks: int
    scored_tasks: int
    scoring_job_id: int | None = Field(description="The latest score_tasks job of the set.")
    lowest: list[TaskScoreOut] = Field(description="Open tasks of smallest margin, first handed out.")


def task_order_out(prompt_set: PromptSet, summary) -> TaskOrderOut:
    """`summary`: app.services.active_learning.OrderSummary."""
    return TaskOrderOut(
        prompt_set_id=prompt_set.id, task_order=summary.task_order, order_model_id=prompt_set.order_model_id,
        scoring_model_id=summary.scoring_model.id if summary.scoring_model else None,
        open_tasks=summary.open_tasks, scored_tasks=summary.scored_tasks,
        scoring_job_id=summary.job.id if summary.job else None,
        lowest=[TaskScoreOut.model_validate(row) for row in summary.lowest])
