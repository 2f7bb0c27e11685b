"""Batched sampling of K responses per prompt, and the `generate` job.

Every response has its own seed, derived from the prompt set's seed, the prompt
id, the sample index and the resample attempt. Sampling draws each row's next
token from that row's own random stream (trainer/sampling.py), so a response
depends on its seed only, not on which other prompts shared its batch: a run
that resumes after a crash produces what an uninterrupted run would have.

A ranking set in best-of-N mode (prompt_sets.best_of_n) samples N responses per
prompt instead of K, all stored; the reward model chosen with the mode scores them
(trainer/best_of_n.RewardRanker) and the K with the highest reward become the task,
which records N, the reward model and every candidate's reward (tasks.selection).

The job writes a batch's responses, the tasks of the prompts it completes and
the job's progress in one transaction; a run that dies loses at most the
batch in flight, and the next run starts from the prompts that still have no
task (the unique (prompt_id, round, sample_index) and (prompt_id, round)
constraints make a second writer harmless).
"""

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Any

import torch
from sqlalchemy import exists, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.db.enums import JobKind, ModelKind, PromptSetKind, PromptSetStatus
from app.db.models import Model, Prompt, PromptSet, Response, Task, TaskResponse
from app.services import active_learning
from trainer.jobs import JobCancelled, JobContext, JobFailed, handler
from trainer.models import resolve_model_path
from trainer.sampling import Sample, SamplingSettings, derive_seed, load_sampler

log = logging.getLogger(__name__)

# Rounds of resampling for empty responses or repeats of another response of
# the same prompt; what is still empty or repeated after them is kept.
MAX_RESAMPLE_ROUNDS = 4


def job_sampler(ctx: JobContext, path: str, engine: str):
    """load_sampler on the job's device; an engine that cannot run here fails the job with the reason."""
    try:
        return load_sampler(path, ctx.device, ctx.dtype, engine)
    except ValueError as error:
        raise JobFailed(str(error)) from error


def sample_batch(sampler, items: Sequence[tuple[list, int, Sequence[int], Sequence[str]]],
                 settings: SamplingSettings) -> tuple[list[dict[int, Sample]], int, int]:
    """For each (messages, prompt_seed, sample indexes, texts it already has): a
    response per index, all in one batch. Empty responses and repeats of another
    response of the same prompt are drawn again with a new seed, for up to
    MAX_RESAMPLE_ROUNDS rounds. Returns ({index: sample} per item, resampled,
    unresolved)."""
    results: list[dict[int, Sample]] = [{} for _ in items]
    pending = [(i, idx) for i, (_, _, indexes, _) in enumerate(items) for idx in indexes]
    resampled = 0
    for attempt in range(MAX_RESAMPLE_ROUNDS + 1):
        if not pending:
            break
        seeds = [derive_seed(items[i][1], idx, attempt) for i, idx in pending]
        samples = sampler.sample([items[i][0] for i, _ in pending], seeds, settings)
        retry = []
        for (i, idx), sample in zip(pending, samples, strict=True):
            taken = set(items[i][3]) | {s.text for j, s in results[i].items() if j != idx}
            results[i][idx] = sample
            if (not sample.text or sample.text in taken) and attempt < MAX_RESAMPLE_ROUNDS:
                retry.append((i, idx))
        # Repeats within this round: the first keeps its text, later ones are drawn again.
        pending = retry
        resampled += len(retry)
    unresolved = 0
    for i, (_, _, _, existing) in enumerate(items):
        texts = list(existing) + [s.text for s in results[i].values()]
        unresolved += sum(1 for t in texts if not t) + len(texts) - len(set(texts))
    return results, resampled, unresolved


# ---- the job -------------------------------------------------------------------

def generator_model(session: Session, prompt_set: PromptSet) -> Model:
    """The set's generator, else the default SFT model. Raises JobFailed."""
    if prompt_set.generator_model_id is not None:
        model = session.get(Model, prompt_set.generator_model_id)
        if model is None:
            raise JobFailed(f"The generator model (id {prompt_set.generator_model_id}) of '{prompt_set.name}' is gone.")
        return model
    model = session.scalar(select(Model).where(Model.kind == ModelKind.sft, Model.is_default))
    if model is None:
        raise JobFailed(
            f"The prompt set '{prompt_set.name}' has no generator model and no default SFT model is "
            "registered: choose a generator for the set, or register one with `rlhf models add`.")
    return model


def _prompts_without_task(session: Session, prompt_set: PromptSet) -> list[int]:
    has_task = exists().where(Task.prompt_id == Prompt.id, Task.round == prompt_set.round)
    return list(session.scalars(
        select(Prompt.id).where(Prompt.prompt_set_id == prompt_set.id, ~has_task).order_by(Prompt.id)
    ))


def _stop_if_not_generating(prompt_set: PromptSet) -> None:
    if prompt_set.status in (PromptSetStatus.paused, PromptSetStatus.archived):
        raise JobCancelled(f"Stopped: the prompt set '{prompt_set.name}' is {prompt_set.status.value}.")


def _follow_new_round(session: Session, prompt_set: PromptSet, round_: int) -> int | None:
    """When a new generator was promoted (the set's round moved on) while this job ran,
    queue a job for the new round and return its id; this job stops. Commits."""
    if prompt_set.round == round_:
        return None
    from app.services.jobs import enqueue_job

    follow = enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": prompt_set.id},
                         prompt_set_id=prompt_set.id, commit=False)
    session.commit()
    log.info("set %s moved to round %d; job %d generates it", prompt_set.id, prompt_set.round, follow.id)
    return follow.id


@dataclass(frozen=True)
class BestOfNRound:
    """A round generated as the top K of N samples by a reward model."""

    n: int
    reward_model_id: int
    reward_model: str
    path: str  # the reward model's stored path


@dataclass(frozen=True)
class Ranked:
    """A prompt's N candidates scored: rewards by sample index, and the indexes best first."""

    rewards: list[float]
    order: list[int]


def best_of_n_round(session: Session, prompt_set: PromptSet) -> BestOfNRound | None:
    """The set's best-of-N mode, or None for plain rounds. Raises JobFailed."""
    if prompt_set.best_of_n is None:
        return None
    model = session.get(Model, prompt_set.best_of_n_reward_model_id)
    if model is None or model.kind != ModelKind.reward:
        raise JobFailed(f"The best-of-N reward model of '{prompt_set.name}' is gone: choose another for the round.")
    return BestOfNRound(prompt_set.best_of_n, model.id, model.name, model.path)


def _create_task(session: Session, prompt: Prompt, prompt_set: PromptSet, prompt_seed: int,
                 mode: BestOfNRound | None = None, ranked: Ranked | None = None) -> bool:
    """The prompt's task with its K responses in a seeded shuffled order, when it
    has them in the round and no task yet: the first K samples, or in best-of-N mode
    the K best of the N by reward, with the candidates' rewards recorded. True when created."""
    k = prompt_set.k
    candidates = mode.n if mode else k
    by_index = {r.sample_index: r for r in session.scalars(
        select(Response).where(Response.prompt_id == prompt.id, Response.round == prompt_set.round,
                               Response.sample_index < candidates))}
    chosen = ranked.order[:k] if ranked else list(range(k))
    if len(by_index) < candidates or any(i not in by_index for i in chosen):
        return False
    selection = None
    if mode is not None and ranked is not None:
        selection = {"mode": "best_of_n", "n": mode.n, "reward_model_id": mode.reward_model_id,
                     "candidates": [{"response_id": by_index[i].id, "reward": round(ranked.rewards[i], 4)}
                                    for i in ranked.order]}
    task_id = session.scalar(
        insert(Task).values(prompt_set_id=prompt_set.id, prompt_id=prompt.id, round=prompt_set.round,
                            k=k, selection=selection)
        .on_conflict_do_nothing(index_elements=["prompt_id", "round"]).returning(Task.id)
    )
    if task_id is None:  # another writer made it
        return False
    # Sample order before the shuffle, so a response's place never tells its reward rank.
    order = [by_index[i] for i in sorted(chosen)]
    random.Random(derive_seed(prompt_seed, "order", prompt_set.round)).shuffle(order)
    session.execute(insert(TaskResponse).values([
        {"task_id": task_id, "response_id": r.id, "position": position} for position, r in enumerate(order)
    ]))
    return True


# ---- evaluation sets: one response per (prompt, model) ------------------------------

def _create_pair_task(session: Session, prompt_set: PromptSet, prompt_id: int, rank: int,
                      n_models: int) -> bool:
    """The prompt's task comparing the pair of models scheduled for it, with the
    scheduled sides (app/services/evaluation.pair_for), once both responses exist."""
    from app.services.evaluation import pair_for

    a, b = pair_for(rank, n_models, prompt_set.seed)
    by_index = dict(session.execute(
        select(Response.sample_index, Response.id)
        .where(Response.prompt_id == prompt_id, Response.round == prompt_set.round,
               Response.sample_index.in_([a, b]))
    ).all())
    if a not in by_index or b not in by_index:
        return False
    task_id = session.scalar(
        insert(Task).values(prompt_set_id=prompt_set.id, prompt_id=prompt_id, round=prompt_set.round, k=2)
        .on_conflict_do_nothing(index_elements=["prompt_id", "round"]).returning(Task.id)
    )
    if task_id is None:
        return False
    session.execute(insert(TaskResponse).values([
        {"task_id": task_id, "response_id": by_index[a], "position": 0},
        {"task_id": task_id, "response_id": by_index[b], "position": 1},
    ]))
    return True


def generate_evaluation(ctx: JobContext, prompt_set_id: int) -> dict[str, Any]:
    """An evaluation set: each model in turn samples one response for every prompt
    that lacks one (sample_index = the model's position), with the set's sampling
    settings and the same seed per prompt for every model; a prompt's task is created
    once both models of its scheduled pair have answered."""
    from app.services.evaluation import set_models

    with ctx.new_session() as session:
        prompt_set = session.get(PromptSet, prompt_set_id)
        _stop_if_not_generating(prompt_set)
        models = [(m.id, m.name, m.path) for m in set_models(session, prompt_set_id)]
        if len(models) < 2:
            raise JobFailed(f"The evaluation '{prompt_set.name}' names fewer than two models.")
        round_, set_seed = prompt_set.round, prompt_set.seed
        settings = SamplingSettings(prompt_set.temperature, prompt_set.top_p, prompt_set.max_new_tokens)
        # A prompt's place in id order picks its pair: every prompt of the set counts.
        ranks = {pid: r for r, pid in enumerate(session.scalars(
            select(Prompt.id).where(Prompt.prompt_set_id == prompt_set_id).order_by(Prompt.id)))}
        have = set(session.execute(
            select(Response.prompt_id, Response.sample_index).join(Prompt, Prompt.id == Response.prompt_id)
            .where(Prompt.prompt_set_id == prompt_set_id, Response.round == round_)
        ).all())
        session.rollback()
    todo = {pos: [pid for pid in ranks if (pid, pos) not in have] for pos in range(len(models))}
    total = sum(len(v) for v in todo.values())
    ctx.progress(0, total)
    engine = str(ctx.params.get("engine", "auto"))
    batch_size = int(ctx.params.get("batch_size") or (256 if ctx.device.type == "cuda" else 32))
    done = n_responses = n_tasks = n_tokens = step = 0
    started = time.perf_counter()
    for pos, (model_id, model_name, model_path) in enumerate(models):
        if not todo[pos]:
            continue
        ctx.check_cancelled(force=True)
        path = resolve_model_path(model_path, ctx.settings.artifacts_path)
        log.info("evaluation %s: %d responses of %s (%s) on %s", prompt_set_id, len(todo[pos]), model_name,
                 path, ctx.device)
        sampler = job_sampler(ctx, path, engine)
        sampling = {**settings.as_dict(), "model": model_name, "engine": sampler.engine}
        for start in range(0, len(todo[pos]), batch_size):
            ctx.check_cancelled()
            chunk = todo[pos][start:start + batch_size]
            with ctx.new_session() as session:
                prompt_set = session.get(PromptSet, prompt_set_id)
                _stop_if_not_generating(prompt_set)
                prompts = session.scalars(select(Prompt).where(Prompt.id.in_(chunk)).order_by(Prompt.id)).all()
                session.rollback()  # no transaction held open while the model runs
                # Index 0 for every model: the same seed per prompt across models.
                items = [(p.messages, derive_seed(set_seed, p.id), [0], []) for p in prompts]
                t0 = time.perf_counter()
                sampled, _, _ = sample_batch(sampler, items, settings)
                batch_s = time.perf_counter() - t0
                rows = [{"prompt_id": p.id, "model_id": model_id, "job_id": ctx.job_id, "round": round_,
                         "sample_index": pos, "text": got[0].text, "num_tokens": got[0].num_tokens,
                         "finish_reason": got[0].finish_reason, "seed": got[0].seed, "sampling": sampling}
                        for p, got in zip(prompts, sampled, strict=True)]
                n_responses += len(session.scalars(
                    insert(Response).values(rows)
                    .on_conflict_do_nothing(index_elements=["prompt_id", "round", "sample_index"])
                    .returning(Response.id)
                ).all())
                batch_tokens = sum(r["num_tokens"] for r in rows)
                n_tokens += batch_tokens
                for p in prompts:
                    n_tasks += _create_pair_task(session, prompt_set, p.id, ranks[p.id], len(models))
                done += len(chunk)
                ctx.progress(done, total, session=session)
                ctx.metrics(step, {"responses_per_s": len(rows) / batch_s if batch_s else 0.0,
                                   "tokens_per_s": batch_tokens / batch_s if batch_s else 0.0}, session=session)
                step += 1
                session.commit()
        del sampler
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    with ctx.new_session() as session:
        # Prompts whose responses all existed before this run (a resumed job) get their task too.
        prompt_set = session.get(PromptSet, prompt_set_id)
        for pid in _prompts_without_task(session, prompt_set):
            n_tasks += _create_pair_task(session, prompt_set, pid, ranks[pid], len(models))
        session.commit()
        # With a promoted reward model, the automatic figures follow the new responses.
        figures = _queue_figures(session, prompt_set) if n_responses else None
    return {"prompts": len(ranks), "responses": n_responses, "tasks": n_tasks, "tokens": n_tokens,
            "models": [name for _, name, _ in models], "seconds": round(time.perf_counter() - started, 2),
            **({"figures_job_id": figures} if figures else {})}


def _queue_figures(session: Session, prompt_set: PromptSet) -> int | None:
    """Queue the evaluation's eval_figures job with the default reward model, if one is
    promoted and no such job is queued or running; its id, else None."""
    from app.services import evaluation, models
    from app.services.errors import Conflict

    reward = models.default_model(session, ModelKind.reward)
    if reward is None:
        return None
    try:
        return evaluation.start_figures_job(session, user_id=prompt_set.created_by_id, prompt_set_id=prompt_set.id,
                                            reward_model_id=reward.id).id
    except Conflict:
        return None


@handler(JobKind.generate)
def generate_job(ctx: JobContext) -> dict[str, Any]:
    """Sample K responses for every prompt of the set's current round that has no
    task yet, and create the tasks. Params: prompt_set_id; optional batch_size
    (sequences per forward batch) and engine ("auto" | "transformers" | "vllm")."""
    prompt_set_id = ctx.params.get("prompt_set_id")
    if not isinstance(prompt_set_id, int):
        raise JobFailed("The job's parameters lack prompt_set_id (an integer).")
    with ctx.new_session() as session:
        prompt_set = session.get(PromptSet, prompt_set_id)
        if prompt_set is None:
            raise JobFailed(f"No prompt set with id {prompt_set_id}.")
        if prompt_set.kind == PromptSetKind.demonstration:
            raise JobFailed(f"The prompt set '{prompt_set.name}' collects demonstrations; it needs no generated responses.")
        if prompt_set.kind == PromptSetKind.evaluation:
            session.rollback()
            return generate_evaluation(ctx, prompt_set_id)
        _stop_if_not_generating(prompt_set)
        model = generator_model(session, prompt_set)
        model_id, model_name, model_path = model.id, model.name, model.path
        mode = best_of_n_round(session, prompt_set)
        k, round_, set_seed = prompt_set.k, prompt_set.round, prompt_set.seed
        per_prompt = mode.n if mode else k  # samples drawn per prompt
        settings = SamplingSettings(prompt_set.temperature, prompt_set.top_p, prompt_set.max_new_tokens)
        todo = _prompts_without_task(session, prompt_set)
    total = len(todo)
    ctx.progress(0, total)
    if not todo:
        with ctx.new_session() as session:
            _follow_new_round(session, session.get(PromptSet, prompt_set_id), round_)
        return {"prompts": 0, "responses": 0, "tasks": 0, "model_id": model_id}

    path = resolve_model_path(model_path, ctx.settings.artifacts_path)
    engine = str(ctx.params.get("engine", "auto"))
    log.info("generating %d x %d responses for set %s with %s (%s) on %s",
             total, k, prompt_set_id, model_name, path, ctx.device)
    ctx.check_cancelled(force=True)
    sampler = job_sampler(ctx, path, engine)
    ranker = None
    if mode is not None:
        from trainer.best_of_n import RewardRanker, TokenizerMismatch

        try:
            ranker = RewardRanker(resolve_model_path(mode.path, ctx.settings.artifacts_path), ctx.device,
                                  sampler.tokenizer)
        except TokenizerMismatch as error:
            raise JobFailed(f"The reward model '{mode.reward_model}' and the generator '{model_name}' do not share"
                            " a tokenizer: choose a reward model trained from the generator's family.") from error
    batch_size = int(ctx.params.get("batch_size") or (256 if ctx.device.type == "cuda" else 32))
    prompts_per_batch = max(1, batch_size // per_prompt)
    sampling = {**settings.as_dict(), "model": model_name, "engine": sampler.engine}

    done = n_responses = n_tasks = n_resampled = n_unresolved = n_tokens = 0
    started = time.perf_counter()
    for step, start in enumerate(range(0, total, prompts_per_batch)):
        ctx.check_cancelled()
        chunk = todo[start:start + prompts_per_batch]
        with ctx.new_session() as session:
            prompt_set = session.get(PromptSet, prompt_set_id)
            _stop_if_not_generating(prompt_set)
            if (follow := _follow_new_round(session, prompt_set, round_)) is not None:
                return {"prompts": done, "responses": n_responses, "tasks": n_tasks, "model_id": model_id,
                        "stopped": f"round {prompt_set.round} was opened; job #{follow} generates it"}
            prompts = session.scalars(select(Prompt).where(Prompt.id.in_(chunk)).order_by(Prompt.id)).all()
            have: dict[int, dict[int, str]] = {p.id: {} for p in prompts}
            for pid, idx, text in session.execute(
                select(Response.prompt_id, Response.sample_index, Response.text)
                .where(Response.prompt_id.in_(chunk), Response.round == round_)
            ):
                have[pid][idx] = text
            items = [(p.messages, derive_seed(set_seed, p.id), [i for i in range(per_prompt) if i not in have[p.id]],
                      list(have[p.id].values())) for p in prompts]
            known = [have[p.id] for p in prompts]
            session.rollback()  # no transaction held open while the models run

            t0 = time.perf_counter()
            sampled, resampled, unresolved = sample_batch(sampler, items, settings)
            ranked: list[Ranked | None] = [None] * len(prompts)
            if ranker is not None:
                for i, (item, existing, by_index) in enumerate(zip(items, known, sampled, strict=True)):
                    texts = existing | {idx: s.text for idx, s in by_index.items()}
                    ranked[i] = Ranked(*ranker.rank(item[0], [texts[j] for j in range(per_prompt)]))
            batch_s = time.perf_counter() - t0
            n_resampled += resampled
            n_unresolved += unresolved

            rows = []
            for prompt, by_index in zip(prompts, sampled, strict=True):
                for idx, s in by_index.items():
                    rows.append({"prompt_id": prompt.id, "model_id": model_id, "job_id": ctx.job_id,
                                 "round": round_, "sample_index": idx, "text": s.text,
                                 "num_tokens": s.num_tokens, "finish_reason": s.finish_reason,
                                 "seed": s.seed, "sampling": sampling})
            if rows:
                written = session.scalars(
                    insert(Response).values(rows)
                    .on_conflict_do_nothing(index_elements=["prompt_id", "round", "sample_index"])
                    .returning(Response.id)
                ).all()
                n_responses += len(written)
            batch_tokens = sum(r["num_tokens"] for r in rows)
            n_tokens += batch_tokens
            for prompt, item, scored in zip(prompts, items, ranked, strict=True):
                n_tasks += _create_task(session, prompt, prompt_set, item[1], mode, scored)
            done += len(chunk)
            # Responses, tasks and progress commit together: a crash loses the batch, never half of it.
            ctx.progress(done, total, session=session)
            figures = {
                "responses_per_s": len(rows) / batch_s if batch_s else 0.0,
                "tokens_per_s": batch_tokens / batch_s if batch_s else 0.0,
                "resampled": float(resampled),
            }
            if ranker is not None:  # the mean reward of the K shown against that of all N
                figures["shown_reward"] = mean(r.rewards[i] for r in ranked for i in r.order[:k])
                figures["mean_reward"] = mean(x for r in ranked for x in r.rewards)
            ctx.metrics(step, figures, session=session)
            session.commit()
    elapsed = time.perf_counter() - started
    with ctx.new_session() as session:
        prompt_set = session.get(PromptSet, prompt_set_id)
        if n_tasks:  # new tasks of a set ordered by uncertainty: the reward model scores them
            active_learning.queue_scoring_if_needed(session, prompt_set=prompt_set, created_by_id=None)
            session.commit()
        # A round opened while the last batch ran is generated by a job of its own.
        _follow_new_round(session, prompt_set, round_)
    out = {
        "prompts": total, "responses": n_responses, "tasks": n_tasks, "resampled": n_resampled,
        "unresolved": n_unresolved, "tokens": n_tokens, "model_id": model_id, "model": model_name,
        "engine": sampler.engine, "seconds": round(elapsed, 2),
    }
    if mode is not None:
        out |= {"best_of_n": mode.n, "reward_model_id": mode.reward_model_id, "reward_model": mode.reward_model}
    return out
