"""The generate job: K responses per prompt, tasks in a stored shuffled order,
reproducible seeds, resampling, resume after a killed worker."""

import os
import re
import signal
import time
from collections import Counter

import pytest
from procrastinate.exceptions import JobAborted
from sqlalchemy import delete, func, select

from app.config import Settings
from app.db.enums import JobKind, JobStatus, ModelKind, PromptSetStatus
from app.db.models import Job, Prompt, PromptSet, Response, Task, TaskResponse
from app.db.session import new_session
from app.services import jobs
from tests.conftest import default_model_dir
from tests.factories import add_prompt, make_model, make_prompt_set, synthetic
from tests.workers import load_job, pid_of, wait_for, workers  # noqa: F401 (fixture)
from trainer.worker import execute_job


def run_generate(prompt_set_id: int, **params) -> int:
    """Queue a generate job and run it here, as a worker would (no queue involved)."""
    with new_session() as session:
        job = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": prompt_set_id, **params})
    execute_job(job.id, settings=Settings(device="cpu"))
    return job.id


def snapshot(prompt_set_id: int) -> tuple[dict, dict]:
    """({(prompt_id, sample_index): text}, {prompt_id: [sample_index by position]})."""
    with new_session() as session:
        texts = {(r.prompt_id, r.sample_index): r.text for r in session.scalars(
            select(Response).join(Prompt).where(Prompt.prompt_set_id == prompt_set_id))}
        orders = {}
        for task in session.scalars(select(Task).where(Task.prompt_set_id == prompt_set_id)):
            orders[task.prompt_id] = [item.response.sample_index for item in task.items]
    return texts, orders


@pytest.fixture
def tiny_set(committed, tiny_model_dir):
    def make(n_prompts=4, k=2, max_new_tokens=12, **values):
        with new_session() as session:
            model = make_model(session, tiny_model_dir)
            prompt_set = make_prompt_set(session, model=model, prompts=[f"Tell me about topic {i}." for i in
                                                                        range(n_prompts)],
                                         k=k, max_new_tokens=max_new_tokens, **values)
            session.commit()
            return prompt_set.id
    return make


def test_generate_samples_k_responses_per_prompt_and_creates_shuffled_tasks(tiny_set):
    set_id = tiny_set(n_prompts=6, k=4, max_new_tokens=8)
    job = load_job(run_generate(set_id, batch_size=12))
    assert job.status == JobStatus.succeeded, job.traceback
    assert (job.progress_done, job.progress_total) == (6, 6)
    assert job.result["prompts"] == 6 and job.result["responses"] == 24 and job.result["tasks"] == 6

    with new_session() as session:
        responses = session.scalars(select(Response).join(Prompt).where(Prompt.prompt_set_id == set_id)).all()
        tasks = session.scalars(select(Task).where(Task.prompt_set_id == set_id)).all()
        by_prompt = {}
        for r in responses:
            by_prompt.setdefault(r.prompt_id, []).append(r)
            assert r.finish_reason in ("eos", "length")
            assert 0 <= r.num_tokens <= 8 and (r.finish_reason == "eos" or r.num_tokens == 8)
            assert r.sampling["temperature"] == 1.0 and r.sampling["max_new_tokens"] == 8
            assert r.seed is not None and r.job_id == job.id and r.round == 1
        assert len(by_prompt) == 6
        for rs in by_prompt.values():
            assert sorted(r.sample_index for r in rs) == [0, 1, 2, 3]
            assert all(r.text for r in rs) and len({r.text for r in rs}) == 4  # non-empty, distinct
        assert len({r.seed for r in responses}) == 24
        assert len(tasks) == 6
        orders = []
        for task in tasks:
            assert task.k == 4 and task.round == 1
            assert [i.position for i in task.items] == [0, 1, 2, 3]
            assert {i.response.prompt_id for i in task.items} == {task.prompt_id}
            orders.append(tuple(i.response.sample_index for i in task.items))
    assert len(set(orders)) > 1  # shuffled, not always in sampling order


def test_generation_is_reproducible_from_the_set_seed(tiny_set):
    set_id = tiny_set(n_prompts=2, k=3, seed=11, max_new_tokens=8)
    run_generate(set_id, batch_size=6)
    first = snapshot(set_id)
    with new_session() as session:
        session.execute(delete(Task).where(Task.prompt_set_id == set_id))
        session.execute(delete(Response))
        session.commit()
    # Another batch size: each response depends on its own seed only.
    run_generate(set_id, batch_size=3)
    assert snapshot(set_id) == first

    with new_session() as session:
        session.execute(delete(Task).where(Task.prompt_set_id == set_id))
        session.execute(delete(Response))
        session.get(PromptSet, set_id).seed = 12
        session.commit()
    run_generate(set_id, batch_size=6)
    assert snapshot(set_id)[0] != first[0]


def test_generation_only_fills_prompts_without_a_task(tiny_set):
    set_id = tiny_set(n_prompts=2, k=2)
    run_generate(set_id)
    before, _ = snapshot(set_id)
    with new_session() as session:
        prompt_set = session.get(PromptSet, set_id)
        add_prompt(session, prompt_set, "A prompt imported later.")
        session.commit()
    job = load_job(run_generate(set_id))
    after, orders = snapshot(set_id)
    assert job.progress_total == 1 and job.result["responses"] == 2
    assert {key: after[key] for key in before} == before  # earlier responses untouched
    assert len(after) == 6 and len(orders) == 3


def test_identical_responses_are_resampled_a_bounded_number_of_times(tiny_set):
    # One token at a near-zero temperature: every draw of a prompt is the same token.
    set_id = tiny_set(n_prompts=1, k=3, max_new_tokens=1, temperature=0.01)
    job = load_job(run_generate(set_id))
    assert job.status == JobStatus.succeeded
    from trainer.generate import MAX_RESAMPLE_ROUNDS

    # At least the two repeats are redrawn in every round (all three when the one
    # token decodes to nothing), and never more rounds than the bound.
    assert 2 * MAX_RESAMPLE_ROUNDS <= job.result["resampled"] <= 3 * MAX_RESAMPLE_ROUNDS
    assert job.result["unresolved"] >= 2  # kept after the last round: the task still has K responses
    texts, orders = snapshot(set_id)
    assert len(texts) == 3 and len(orders) == 1


def test_paused_set_stops_the_job(tiny_set):
    set_id = tiny_set(n_prompts=2, status=PromptSetStatus.paused)
    with new_session() as session:
        job = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": set_id})
    with pytest.raises(JobAborted):
        execute_job(job.id, settings=Settings(device="cpu"))
    stopped = load_job(job.id)
    assert stopped.status == JobStatus.cancelled
    assert "is paused" in stopped.error
    assert snapshot(set_id) == ({}, {})


def test_set_without_generator_uses_the_default_sft_model(committed, tiny_model_dir):
    with new_session() as session:
        make_model(session, tiny_model_dir, kind=ModelKind.policy)
        default = make_model(session, tiny_model_dir, is_default=True)
        prompt_set = make_prompt_set(session, prompts=["Hello?"], k=2, max_new_tokens=12)
        orphan = make_prompt_set(session, prompts=["Hi?"], k=2, max_new_tokens=12)
        session.commit()
    job = load_job(run_generate(prompt_set.id))
    assert job.status == JobStatus.succeeded and job.result["model_id"] == default.id

    with new_session() as session:
        session.get(type(default), default.id).is_default = False
        session.commit()
    with pytest.raises(Exception):
        run_generate(orphan.id)
    with new_session() as session:
        failed = session.scalars(select(Job).order_by(Job.id.desc())).first()
    assert failed.status == JobStatus.failed
    assert "no generator model and no default SFT model" in failed.error


def test_generate_resumes_after_a_killed_worker_without_duplicates_or_gaps(workers, tiny_model_dir):
    n_prompts, k = 12, 2
    with new_session() as session:
        model = make_model(session, tiny_model_dir)
        prompt_set = make_prompt_set(session, model=model, k=k, max_new_tokens=8,
                                     prompts=[f"Question number {i}?" for i in range(n_prompts)])
        job = jobs.enqueue_job(session, kind=JobKind.generate,
                               params={"prompt_set_id": prompt_set.id, "batch_size": 2})
    first = workers.start(cli=True)  # the real `rlhf worker`
    running = wait_for(lambda: (j := load_job(job.id)).progress_done >= 2 and j, 120, "generation to start",
                       workers)
    assert pid_of(running) == first.pid and running.progress_done < n_prompts
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    with new_session() as session:
        kept = set(session.scalars(select(Response.id)))
    assert kept  # the first run's batches were committed

    workers.start(cli=True)
    done = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 120, "generation to finish",
                    workers)
    assert done.status == JobStatus.succeeded, done.error
    assert done.attempts == 2
    with new_session() as session:
        per_prompt = Counter(session.scalars(select(Response.prompt_id)))
        assert kept <= set(session.scalars(select(Response.id)))  # nothing written twice or replaced
        n_tasks = session.scalar(select(func.count()).select_from(Task))
        n_items = session.scalar(select(func.count()).select_from(TaskResponse))
    assert len(per_prompt) == n_prompts and set(per_prompt.values()) == {k}
    assert n_tasks == n_prompts and n_items == n_prompts * k


def test_in_process_worker_of_serve_runs_generation_and_stops(tiny_set):
    from trainer.worker import start_background_worker

    set_id = tiny_set(n_prompts=2, k=2)
    settings = Settings(device="cpu", worker_poll_interval_s=0.2, worker_heartbeat_s=0.5,
                        worker_recovery_interval_s=1, worker_shutdown_timeout_s=2)
    worker = start_background_worker(settings)
    try:
        assert worker.wait_ready(30)
        with new_session() as session:
            job = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": set_id})
        done = wait_for(lambda: load_job(job.id).status.finished and load_job(job.id), 60, "generation")
        assert done.status == JobStatus.succeeded and done.result["tasks"] == 2
    finally:
        started = time.monotonic()
        worker.stop()
        assert not worker.thread.is_alive() and time.monotonic() - started < 15


ENGLISH = {"the", "a", "an", "is", "are", "to", "of", "and", "in", "it", "you", "i", "can", "for", "that",
           "this", "be", "with", "as", "on", "or", "your", "have", "my", "not"}


@pytest.mark.slow
def test_default_model_generates_english_text(committed):
    path = default_model_dir()
    with new_session() as session:
        model = make_model(session, path.resolve(), name="SmolLM2-135M-Instruct (test)")
        prompt_set = make_prompt_set(session, model=model, k=2, max_new_tokens=40, temperature=0.7, top_p=0.9,
                                     prompts=["How do I boil an egg?", "Give me a tip for sleeping well."])
        session.commit()
    job = load_job(run_generate(prompt_set.id))
    assert job.status == JobStatus.succeeded, job.traceback
    texts, orders = snapshot(prompt_set.id)
    assert len(texts) == 4 and len(orders) == 2
    for text in texts.values():
        assert text.strip()
        words = re.findall(r"[A-Za-z']+", text.lower())
        assert len(words) >= 3, text
        letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
        assert letters / len(text) > 0.8, text
        assert ENGLISH & set(words), text


def test_a_round_opened_while_generating_is_generated_by_the_new_model(tiny_set, tiny_model_dir):
    """Promoting a model while the set's generation runs: the running job stops writing the
    old round and a job of its own generates the new one, whenever the promotion lands."""
    import threading

    from app.services import models

    set_id = tiny_set(n_prompts=12, k=2, max_new_tokens=6)
    with new_session() as session:
        policy = make_model(session, tiny_model_dir, kind=ModelKind.policy)
        session.commit()
        policy_id = policy.id
        first = jobs.enqueue_job(session, kind=JobKind.generate, params={"prompt_set_id": set_id, "batch_size": 2},
                                 prompt_set_id=set_id)
        first_id = first.id
    runner = threading.Thread(target=execute_job, args=(first_id,), kwargs={"settings": Settings(device="cpu")})
    runner.start()
    wait_for(lambda: load_job(first_id).progress_done >= 1, timeout=60)
    with new_session() as session:
        _, queued = models.promote_generator(session, model_id=policy_id, prompt_set_id=set_id, user_id=None)
    runner.join(120)
    # Run what is queued for the set (the hand-off job, or the one promotion queued) until none is left.
    while True:
        with new_session() as session:
            waiting = session.scalars(select(Job.id).where(Job.kind == JobKind.generate,
                                                                Job.status == JobStatus.queued)).all()
        if not waiting:
            break
        for job_id in waiting:
            execute_job(job_id, settings=Settings(device="cpu"))
    with new_session() as session:
        round_two = session.scalars(select(Task).where(Task.prompt_set_id == set_id, Task.round == 2)).all()
        assert len(round_two) == 12
        models = set(session.scalars(select(Response.model_id).where(Response.round == 2)))
        assert models == {policy_id}
        runs = session.scalars(select(Job).where(Job.kind == JobKind.generate).order_by(Job.id)).all()
        assert len(runs) == 2  # the first job, and one for round 2


def test_sampler_ignores_the_sampling_settings_of_the_checkpoint(tiny_model_dir, tmp_path):
    """transformers 5 fills every generate() setting left unset from generation_config.json: a checkpoint
    with min_p or a repetition penalty must not change what the annotation sampler draws."""
    import shutil

    import torch
    from transformers import GenerationConfig

    from tests.factories import synthetic
    from trainer.sampling import SamplingSettings, TransformersSampler

    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=12)
    conversations, seeds = [synthetic.prompt(i) for i in range(4)], [11, 12, 13, 14]
    cpu = torch.device("cpu")
    sampler = TransformersSampler(str(tiny_model_dir), cpu, torch.float32)
    plain = sampler.sample(conversations, seeds, settings)
    # A random model's draws are near uniform over the vocabulary, where a penalty on a few tokens seldom
    # shows: the checkpoint also suppresses every token the plain draws picked.
    picked = sorted({t for s in plain for t in sampler.tokenizer(s.text, add_special_tokens=False).input_ids})
    leaky = tmp_path / "leaky"
    shutil.copytree(tiny_model_dir, leaky)
    GenerationConfig(do_sample=True, min_p=0.3, repetition_penalty=1.3, no_repeat_ngram_size=2,
                     suppress_tokens=picked).save_pretrained(leaky)
    leaked = TransformersSampler(str(leaky), cpu, torch.float32).sample(conversations, seeds, settings)
    assert [s.text for s in leaked] == [s.text for s in plain]



# The seeded sampler's draws, pinned: a change of sampler that changes the tokens drawn for a seed changes
# what repeated and resumed runs produce, and must be deliberate (re-pin). Issue 15 changed them once: the
# sampler now takes one counter-based uniform number per row and step instead of a vocabulary of noise.
PINNED_DRAWS = {  # (logit scale, temperature, top_p): picked tokens of rows seeded 1..4, three steps
    (1.0, 1.0, 1.0): [[27887, 28972, 5662, 21104], [36708, 36861, 34541, 43824], [47774, 29201, 30232, 42259]],
    (1.0, 0.7, 0.9): [[3804, 1385, 36761, 46892], [43610, 44436, 28897, 2528], [39474, 1647, 30765, 34405]],
    (4.0, 1.0, 0.95): [[393, 26336, 32414, 43453], [39907, 44675, 33030, 5627], [42557, 26336, 39075, 2175]],
    (4.0, 0.7, 0.9): [[36885, 5355, 41849, 43453], [36885, 5355, 28194, 43453], [393, 5355, 8551, 43453]],
    (8.0, 1.3, 0.5): [[36885, 31769, 41849, 43453], [36885, 5355, 6598, 43453], [36885, 31769, 6598, 43453]],
}


def draw(seeds, logits, temperature, top_p, steps=3):
    import torch

    from trainer.sampling import SeededSampler

    sampler = SeededSampler(seeds, temperature, top_p)
    input_ids = torch.zeros(len(seeds), 1, dtype=torch.long)
    return [sampler(input_ids, logits).argmax(-1).tolist() for _ in range(steps)]


@pytest.mark.parametrize("scale,temperature,top_p", list(PINNED_DRAWS))
def test_seeded_sampler_draws_the_pinned_tokens_whatever_the_batch(scale, temperature, top_p):
    """Flat (scale 1: the nucleus is most of the vocabulary, wider than the first top-k window) and peaked
    (scale 4, 8: a few tokens) logits; each row draws the same alone as in the batch."""
    import torch

    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0)) * scale
    drawn = draw([1, 2, 3, 4], logits, temperature, top_p)
    assert drawn == PINNED_DRAWS[scale, temperature, top_p]
    for row, seed in enumerate([1, 2, 3, 4]):
        alone = draw([seed], logits[row:row + 1], temperature, top_p)
        assert [step[0] for step in alone] == [step[row] for step in drawn]


@pytest.mark.parametrize("temperature,top_p,expected", [
    (1.0, 1.0, [0.5609, 0.2063, 0.1252, 0.0759, 0.0279, 0.0038]),
    (1.0, 0.8, [0.6285, 0.2312, 0.1402, 0, 0, 0]),  # the nucleus: 0.56 + 0.21 < 0.8, the third reaches it
    (0.5, 0.9, [0.8808, 0.1192, 0, 0, 0, 0]),  # 0.8668 < 0.9: the second token reaches it
])
def test_seeded_sampler_draws_from_the_temperature_and_top_p_distribution(temperature, top_p, expected):
    """20,000 rows with their own seeds: the frequencies match softmax(logits / T) cut to the nucleus."""
    import torch

    n = 20_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).expand(n, 6)
    picked = torch.tensor(draw(list(range(n)), logits, temperature, top_p, steps=1)[0])
    frequencies = torch.bincount(picked, minlength=6) / n
    assert frequencies.tolist() == pytest.approx(expected, abs=0.015)
    assert all(frequencies[i] == 0 for i, p in enumerate(expected) if p == 0)


def test_sampler_responses_are_pinned_and_do_not_depend_on_the_batch(tiny_model_dir):
    """The generate job's sampler on the tiny model: pinned responses for fixed seeds, and each row the same
    alone as in a batch with other (differently long, so differently padded) prompts."""
    import torch

    from tests.factories import synthetic
    from trainer.sampling import SamplingSettings, TransformersSampler

    sampler = TransformersSampler(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    conversations, seeds = [synthetic.prompt(i) for i in range(3)], [11, 12, 13]
    pinned = {
        SamplingSettings(1.0, 1.0, 6): ["argvagleopedic percentagesSheawk", "sizes Balancedrizona straining Historianasted",
                                        "Intermediateuated translatorThoseSon utils"],
        SamplingSettings(0.7, 0.9, 6): ["tricksslot perenn retrie ideologiesVIS", "geComp superheroescos rebel´",
                                        "commemoratingChrisMas adopts An cutoff"],
    }
    for settings, texts in pinned.items():
        batched = sampler.sample(conversations, seeds, settings)
        assert [s.text for s in batched] == texts
        assert [(s.num_tokens, s.finish_reason, s.seed) for s in batched] == [(6, "length", seed) for seed in seeds]
        alone = [sampler.sample([c], [seed], settings)[0] for c, seed in zip(conversations, seeds, strict=True)]
        assert alone == batched
