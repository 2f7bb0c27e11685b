"""The train_sft job: only accepted demonstrations are trained on, the split is the
prompts', progress and curves reach the job, the result is registered as an SFT model."""

from sqlalchemy import select

from app.config import Settings
from app.db.enums import DemonstrationStatus, JobStatus, ModelKind, Role, Split
from app.db.models import Demonstration, Job, JobMetric, Model
from app.db.session import new_session
from app.services import demonstrations as demos
from app.services import models, training
from app.services.prompt_sets import GENERATOR_KINDS
from tests.factories import add_prompt, demonstration_set, make_user
from trainer.sft_job import split_examples
from trainer.worker import execute_job

SKY = "Question {i}: what colour is the sky?"


def item(prompt_id: int, split: Split, text: str = "q") -> demos.AcceptedDemonstration:
    return demos.AcceptedDemonstration(prompt_id, prompt_id, 1, [{"role": "user", "content": text}], "a", split, 1)


def test_validation_comes_from_the_validation_split_or_is_borrowed_from_training():
    train, val = split_examples([item(1, Split.train), item(2, Split.validation), item(3, Split.rl)])
    assert (len(train), len(val)) == (2, 1)
    train, val = split_examples([item(i, Split.train, f"q{i}") for i in range(1, 21)])
    assert (len(train), len(val)) == (18, 2)
    assert [m.messages[0]["content"] for m in val] == ["q19", "q20"]  # stable: the last prompts
    train, val = split_examples([item(1, Split.train)])
    assert (len(train), len(val)) == (1, 0)  # one prompt cannot be split: the job fails with a message


def test_train_sft_job_trains_on_accepted_demonstrations_and_registers_an_sft_model(committed, tiny_model_dir,
                                                                                      tmp_path):
    with new_session() as session:
        admin, alice = make_user(session, role=Role.admin), make_user(session)
        base = Model(name="tiny-base", kind=ModelKind.sft, path=str(tiny_model_dir), source="test")
        session.add(base)
        s = demonstration_set(session, admin, prompts=6, validation=2, question=SKY, answer="Blue.")
        # A labeler's demonstrations that are not accepted never reach training.
        for status in (DemonstrationStatus.submitted, DemonstrationStatus.rejected, DemonstrationStatus.draft):
            prompt = add_prompt(session, s, f"Not accepted: {status.value}")
            session.add(Demonstration(prompt_id=prompt.id, user_id=alice.id, text="NOPE", status=status))
        session.commit()
        job = training.start_sft_job(session, user_id=admin.id, base_model_id=base.id, prompt_set_ids=[s.id],
                                values={"epochs": "2", "batch_size": "2", "learning_rate": "1e-3",
                                        "max_length": "96", "packing": "on"}, name="tiny-sft")
        job_id, base_id, set_id = job.id, base.id, s.id

    settings = Settings(device="cpu", data_dir=tmp_path)
    execute_job(job_id, settings=settings)

    with new_session() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded, job.traceback
        assert (job.result["train_examples"], job.result["val_examples"]) == (4, 2)
        assert job.result["val_loss"] < job.result["initial_val_loss"]
        assert job.progress_done == job.progress_total == job.result["steps"] > 0
        model = session.get(Model, job.model_id)
        assert (model.name, model.kind, model.parent_id, model.job_id) == ("tiny-sft", ModelKind.sft, base_id, job_id)
        assert model.source == "train_sft" and len(model.sha256) == 64
        assert model.config["prompt_set_ids"] == [set_id] and model.config["sft"]["packing"] is True
        assert abs(model.metrics["val_loss"] - job.result["val_loss"]) < 1e-4
        path = settings.artifacts_path / model.path
        assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
        curves = {(m.name, m.step) for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id))}
        assert ("val_loss", 0) in curves and ("loss", 1) in curves and ("val_loss", job.result["steps"]) in curves
        assert not any(name == "total_steps" for name, _ in curves)
        # The parent and the new model answered the same validation prompts, kept side by side.
        pairs = models.side_by_side(session, model.id)
        assert [p.messages[0]["content"] for p in pairs][:2] == [SKY.format(i=i) for i in (4, 5)]
        assert all(p.before is not None and p.after is not None and p.after.reward is None for p in pairs)
        # The new model can generate: it is offered as a base model and as a generator.
        assert model.id in [m.id for m in models.models_of(session, GENERATOR_KINDS)]
