"""Schemas of the evaluations API. Types only: the rules (two or more SFT or policy
models, prompts given, sampling ranges) are checked once, in app.services.evaluation
and app.services.prompt_sets, so the API and the page answer with the same messages."""

from datetime import datetime

from pydantic import BaseModel, Field

from app.db.enums import PromptSetStatus
from app.schemas.common import Id, Text
from app.services.prompt_sets import DEFAULTS


class EvaluationIn(BaseModel):
    name: Text = Field(max_length=1000, description="Labelers see it: do not name the models in it.")
    model_ids: list[Id] = Field(max_length=20, description="Two to nine SFT or policy models.")
    source_set_ids: list[Id] = Field(default_factory=list, max_length=100, description=(
        "Ranking sets whose validation prompts the evaluation takes."))
    prompts: Text = Field(default="", max_length=50_000_000, description=(
        "Prompts of your own, as JSONL, a JSON array or CSV (as the prompt import takes them)."))
    instructions: Text = Field(default="", description="Markdown shown to labelers.")
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    seed: int = DEFAULTS["seed"]
    overlap: int = Field(default=DEFAULTS["overlap"], description="Labelers per task.")


class ModelOut(BaseModel):
    id: int
    name: str
    kind: str
    position: int


class PairOut(BaseModel):
    model_x_id: int
    model_x: str
    model_y_id: int
    model_y: str
    votes: int
    wins: int = Field(description="Votes preferring model_x.")
    losses: int
    ties: int
    both_bad: int
    win_rate: float | None = Field(description="model_x's win rate, ties and both-bad counting half.")
    interval_low: float | None = Field(description="95% Wilson interval of the win rate.")
    interval_high: float | None
    x_shown_as_a: int = Field(description="Votes that showed model_x as response A (sides are balanced).")


class LabelerOut(BaseModel):
    labeler_id: int
    labeler: str
    consensus_agreement: float | None
    pairs: list[PairOut]


class AgreementOut(BaseModel):
    pairwise_agreement: float | None = Field(description="Share of shared tasks where two labelers chose the same winner.")
    pairs: int
    tie_rate: float | None


class LengthOut(BaseModel):
    model_id: int
    model: str
    responses: int
    mean_tokens: float | None
    mean_chars: float | None


class RewardPairOut(BaseModel):
    model_x_id: int
    model_x: str
    model_y_id: int
    model_y: str
    tasks: int = Field(description="The pair's tasks whose two responses the reward model scored.")
    rm_win_rate: float | None = Field(description="Share of those tasks where the reward model prefers model_x "
                                                  "(equal rewards half).")
    votes: int = Field(description="Counted human votes choosing a side on those responses.")
    agreement: float | None = Field(description="Share of those votes where the reward model prefers the same side.")


class KLOut(BaseModel):
    model_id: int
    model: str
    reference_id: int
    reference: str
    kl: float = Field(description="Mean over the policy's responses of sum over tokens of log pi - log ref "
                                  "(nats; a Monte-Carlo estimate of KL(pi || ref) on the set's prompts).")
    kl_stderr: float = Field(description="Standard error of that mean.")
    responses: int


class AutomaticOut(BaseModel):
    job_id: int
    computed_at: datetime | None
    reward_model_id: int
    reward_model: str
    pairs: list[RewardPairOut]
    kl: list[KLOut] = Field(description="One entry per policy of the set that has a reference.")


class FiguresIn(BaseModel):
    reward_model_id: Id | None = Field(default=None, description="A reward model; the default one when left out.")


class EvaluationOut(BaseModel):
    prompt_set_id: int
    name: str
    status: PromptSetStatus
    votes: int
    models: list[ModelOut]
    pairs: list[PairOut]
    labelers: list[LabelerOut]
    agreement: AgreementOut
    lengths: list[LengthOut]
    automatic: AutomaticOut | None = Field(description=(
        "The automatic figures of the latest eval_figures job that succeeded; null before one."))


class EvaluationBrief(BaseModel):
    prompt_set_id: int
    name: str
    status: PromptSetStatus
    models: list[ModelOut]
    created_at: datetime
