"""The train_reward and train_ppo jobs, run by the worker's own code on a tiny model:
what they read, what they register (lineage, metrics, data snapshot), the samples
they leave for reading side by side, and how they fail."""

import dataclasses

import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db.enums import JobStatus, ModelKind, Role
from app.db.models import Annotation, Job, JobMetric, Model, Task
from app.db.session import new_session
from app.services import training
from tests.conftest import make_user
from tests.factories_jobs import make_model
from tests.training_data import ranked_set
from trainer.jobs import JobFailed
from trainer.ppo import PPOConfig
from trainer.reward import RewardConfig
from trainer.worker import execute_job

REWARD_VALUES = {"epochs": 2, "batch_size": 4, "learning_rate": 1e-3, "max_length": 96, "warmup_ratio": 0}
PPO_VALUES = {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "learning_rate": 1e-4,
              "max_new_tokens": 8}


@pytest.mark.parametrize(("defaults", "settings", "config"), [
    (training.REWARD_DEFAULTS, training.REWARD_SETTINGS, RewardConfig),
    (training.PPO_DEFAULTS, training.PPO_SETTINGS, PPOConfig),
])
def test_form_defaults_are_the_trainer_defaults(defaults, settings, config):
    fields = {f.name: f.default for f in dataclasses.fields(config)}
    assert defaults == fields
    assert {s.name for s in settings} <= set(fields)


def run(job_id: int, tmp_path) -> Job:
    execute_job(job_id, settings=Settings(device="cpu", data_dir=tmp_path))
    with new_session() as session:
        return session.get(Job, job_id)


@pytest.fixture
def trained_reward_model(committed, tiny_model_dir, tmp_path):
    """A reward model trained by a train_reward job on a synthetic ranked set."""
    with new_session() as session:
        engineer, alice = make_user(session, role=Role.engineer), make_user(session)
        base = make_model(session, tiny_model_dir, name="tiny-sft", is_default=True)
        prompt_set = ranked_set(session, alice, prompts=24)
        # One annotation excluded by an admin: it must not reach training.
        excluded = session.scalar(select(Annotation.id).join(Task).where(Task.prompt_set_id == prompt_set.id)
                                  .order_by(Annotation.id.desc()).limit(1))
        session.execute(update(Annotation).where(Annotation.id == excluded).values(excluded=True))
        session.commit()
        job = training.start_reward_job(session, user_id=engineer.id, values=REWARD_VALUES,
                                        prompt_set_ids=[prompt_set.id], name="tiny-rm")
        ids = {"job": job.id, "base": base.id, "set": prompt_set.id, "excluded": excluded,
               "engineer": engineer.id}
    job = run(ids["job"], tmp_path)
    assert job.status == JobStatus.succeeded, job.traceback
    return ids | {"model": job.model_id}


def test_reward_job_registers_a_reward_model_with_its_data_snapshot(trained_reward_model, tmp_path):
    ids = trained_reward_model
    with new_session() as session:
        job, model = session.get(Job, ids["job"]), session.get(Model, ids["model"])
        assert (model.name, model.kind, model.parent_id, model.job_id) == ("tiny-rm", ModelKind.reward,
                                                                          ids["base"], ids["job"])
        included = set(session.scalars(select(Annotation.id).join(Task).where(
            Task.prompt_set_id == ids["set"], Annotation.excluded.is_(False))))
        data = model.config["data"]
        seen = set(data["annotation_ids"]) | set(data["validation_annotation_ids"])
        assert seen == included and ids["excluded"] not in seen
        assert not set(data["annotation_ids"]) & set(data["validation_annotation_ids"])
        assert data["comparisons"] == job.result["comparisons"] > 0
        assert 0 <= model.metrics["val_accuracy"] <= 1 and "reward_mean" in model.metrics
        names = {m.name for m in session.scalars(select(JobMetric).where(JobMetric.job_id == ids["job"]))}
        assert {"loss", "accuracy", "val_accuracy", "val_loss"} <= names and "total_steps" not in names
        assert job.progress_done == job.progress_total == job.result["steps"]
        assert training.related_models(session, model)["base"].id == ids["base"]


def test_ppo_job_registers_a_policy_with_samples_before_and_after(trained_reward_model, tmp_path):
    ids = trained_reward_model
    with new_session() as session:
        job = training.start_ppo_job(session, user_id=ids["engineer"], values=PPO_VALUES,
                                     reward_model_id=ids["model"], prompt_set_ids=[ids["set"]])
        job_id = job.id
    job = run(job_id, tmp_path)
    assert job.status == JobStatus.succeeded, job.traceback
    with new_session() as session:
        policy = session.get(Model, job.model_id)
        assert (policy.kind, policy.parent_id, policy.source) == (ModelKind.policy, ids["base"], "train_ppo")
        related = training.related_models(session, policy)
        assert related["reward"].id == ids["model"] and related["reference"].id == ids["base"]
        assert [m.id for m in training.lineage(session, policy)] == [ids["base"]]
        pairs = training.side_by_side(session, policy.id)
        assert len(pairs) == training.SAMPLE_PROMPTS
        assert all(p.before is not None and p.after is not None for p in pairs)
        assert all(p.before.reward is not None and p.after.reward is not None for p in pairs)
        assert pairs[0].messages == pairs[0].after.messages
        metric_names = {m.name for m in session.scalars(select(JobMetric).where(JobMetric.job_id == job_id))}
        assert {"reward", "kl", "total_reward", "entropy", "policy_loss", "value_loss", "clip_frac",
                "approx_kl", "response_length", "lr"} <= metric_names
        assert job.progress_done == job.progress_total == 2
        # The new policy can generate the next round.
        assert policy.id in [m.id for m in training.models_of(session, training.GENERATOR_KINDS)]


def test_reward_job_fails_with_a_message_when_its_data_is_gone(committed, tiny_model_dir, tmp_path):
    with new_session() as session:
        engineer, alice = make_user(session, role=Role.engineer), make_user(session)
        make_model(session, tiny_model_dir, is_default=True)
        prompt_set = ranked_set(session, alice, prompts=6)
        session.commit()
        job = training.start_reward_job(session, user_id=engineer.id, values=REWARD_VALUES,
                                        prompt_set_ids=[prompt_set.id])
        # Every annotation is excluded after the run was queued.
        session.execute(update(Annotation).where(Annotation.task_id.in_(
            select(Task.id).where(Task.prompt_set_id == prompt_set.id))).values(excluded=True))
        session.commit()
        job_id = job.id
    with pytest.raises(JobFailed):
        run(job_id, tmp_path)
    with new_session() as session:
        job = session.get(Job, job_id)
    assert job.status == JobStatus.failed
    assert "at least two prompts" in job.error and job.model_id is None
