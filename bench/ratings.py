"""Time to fit the leaderboard with bootstrap intervals, for 10k and 100k votes over 20 models.

    .venv/bin/python bench/ratings.py [--sizes 10000 100000] [--bootstrap 200] [--repeat 3]

Synthetic votes: 20 models with known strengths, random pairs, 15% ties, response
lengths that sway the voters a little. Printed side by side, in the same run:

- ours: app.services.ratings.fit_leaderboard, the raw Bradley-Terry ratings and the
  length-controlled ones, each with --bootstrap resamples of the votes (all replicates
  fitted at once by batched Newton steps); and the raw ratings alone;
- loop MM: the textbook way, per fit: resample the votes, count wins and games per
  pair in a Python loop over the votes, then Hunter's (2004) MM iterations (numpy on
  the 20 x 20 matrix); raw ratings only, no length control. Timed on LOOP_FITS fits and
  extrapolated to the 1 + bootstrap fits a leaderboard needs (marked "extrap.");
- per-replicate IRLS: the length-controlled fit one replicate at a time, Newton
  (IRLS) on the dense float64 design matrix of the resampled votes, as a numpy (or
  scikit-learn, as Chatbot Arena's notebook does) user would write it; timed on
  LOOP_FITS fits and extrapolated likewise.
The last column is the largest gap between our raw ratings and the loop MM's on the
same votes (both fits, without the bootstrap), in Elo points: our small ridge prior.
"""

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.services.ratings import ELO_SCALE, RIDGE, Votes, expit, fit_leaderboard  # noqa: E402


MODELS = 20
LOOP_FITS = 3  # fits the baselines are timed on; the rest is extrapolated


def timed(fn, repeat: int) -> tuple[float, float]:
    """The best of `repeat` runs of fn: (wall-clock seconds, CPU seconds of this process).
    On a busy machine the CPU time is what the fit costs; the wall time includes waiting."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        started, started_cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - started), min(cpu, time.process_time() - started_cpu)
    return wall, cpu


def synthetic_votes(n: int, seed: int = 0) -> Votes:
    rng = np.random.default_rng(seed)
    strength = rng.normal(0, 0.8, MODELS)
    mean_length = rng.uniform(200, 800, MODELS)
    a = rng.integers(0, MODELS, n)
    b = (a + rng.integers(1, MODELS, n)) % MODELS
    length_a, length_b = rng.normal(mean_length[a], 100), rng.normal(mean_length[b], 100)
    dlen = length_a - length_b
    p = expit(strength[a] - strength[b] + 0.4 * np.tanh(dlen / dlen.std()))
    score = np.where(rng.random(n) < 0.15, 0.5, (rng.random(n) < p).astype(float))
    return Votes(tuple(f"model-{i}" for i in range(MODELS)), a, b, score, length_a, length_b)


def loop_mm_fit(votes: list[tuple[int, int, float]], iterations: int = 1000) -> np.ndarray:
    """Hunter's MM for Bradley-Terry, the counts gathered vote by vote; ratings in Elo, mean 1000."""
    wins = np.zeros(MODELS)
    games = np.zeros((MODELS, MODELS))
    for a, b, score in votes:  # a Python loop per vote
        wins[a] += score
        wins[b] += 1 - score
        games[a, b] += 1
        games[b, a] += 1
    pi = np.ones(MODELS)
    for _ in range(iterations):
        new = wins / (games / (pi[:, None] + pi[None, :])).sum(axis=1)
        new /= np.exp(np.log(new).mean())
        if np.abs(new - pi).max() < 1e-10:
            break
        pi = new
    theta = np.log(pi)
    return 1000 + ELO_SCALE * (theta - theta.mean())


def irls_fit(design: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Penalised logistic regression by Newton on a dense design matrix (one row per vote)."""
    w = np.zeros(design.shape[1])
    for _ in range(50):
        p = expit(design @ w)
        grad = design.T @ (score - p) - RIDGE * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + RIDGE * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-6:
            break
    return w


def baselines(votes: Votes, fits: int) -> tuple[float, float, np.ndarray]:
    """Seconds per fit of the loop MM and of per-replicate IRLS, and the loop MM's ratings on all votes."""
    records = list(zip(votes.a.tolist(), votes.b.tolist(), votes.score.tolist()))
    n = len(records)
    started = time.perf_counter()
    for i in range(fits):  # the first on the votes themselves, the others on resamples
        ratings = loop_mm_fit(records if i == 0 else random.Random(i).choices(records, k=n))
        if i == 0:
            mm_on_all = ratings
    mm_s = (time.perf_counter() - started) / fits
    dlen = votes.length_a - votes.length_b
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(fits):
        idx = rng.integers(0, n, n)
        design = np.zeros((n, MODELS + 1))
        design[np.arange(n), votes.a[idx]] = 1
        design[np.arange(n), votes.b[idx]] = -1
        design[:, MODELS] = np.tanh(dlen[idx] / np.sqrt(np.mean(dlen ** 2)))
        irls_fit(design, votes.score[idx])
    irls_s = (time.perf_counter() - started) / fits
    return mm_s, irls_s, mm_on_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="votes")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per interval")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours; the best is shown")
    args = parser.parse_args()
    print(f"{MODELS} models, {args.bootstrap} bootstrap resamples; baselines timed on {LOOP_FITS} fits and"
          f" extrapolated to {1 + args.bootstrap}")
    print()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; ours: wall-clock (CPU) seconds")
    print(f"{'votes':>8} | {'ours: raw + length-controlled':>29} | {'ours: raw only':>14} | "
          f"{'loop MM, raw (extrap.)':>22} | {'per-replicate IRLS, LC (extrap.)':>32} | max |ours - MM|")
    for n in args.sizes:
        votes = synthetic_votes(n)
        raw_only = Votes(votes.models, votes.a, votes.b, votes.score)
        ours_s, ours_cpu = timed(lambda: fit_leaderboard(votes, n_bootstrap=args.bootstrap), args.repeat)
        raw_s, raw_cpu = timed(lambda: fit_leaderboard(raw_only, n_bootstrap=args.bootstrap), args.repeat)
        mm_s, irls_s, mm = baselines(votes, LOOP_FITS)
        point = fit_leaderboard(raw_only, n_bootstrap=0)
        gap = max(abs(point.get(m).rating - mm[i]) for i, m in enumerate(votes.models))
        fits = 1 + args.bootstrap
        print(f"{n:>8,} | {f'{ours_s:.2f} s ({ours_cpu:.2f} s)':>29} | {f'{raw_s:.2f} s ({raw_cpu:.2f})':>14} | "
              f"{mm_s * fits:20.1f} s | {irls_s * fits:30.1f} s | {gap:.2f}", flush=True)


if __name__ == "__main__":
    main()
