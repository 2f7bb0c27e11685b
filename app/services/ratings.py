"""Win rates and Bradley-Terry ratings from blind pairwise votes. Pure numpy, no database.

Conventions (the results pages and the README say the same):
- A vote scores 1 for the side judged better, 0 for the other; a tie and "both bad"
  score 1/2 each (as Chatbot Arena counts "tie (bothbad)"). The strength of a vote
  (slightly / clearly / much better) does not change its score here.
- A win rate counts ties half: (wins + ties / 2) / votes, with the Wilson 95%
  interval over that many votes. A tie has less variance than a coin flip, so the
  interval is, if anything, a little wide.
- Bradley-Terry: P(i beats j) = 1 / (1 + exp(-(theta_i - theta_j))), fitted by maximum
  likelihood over all votes, a tie counting as half a win and half a loss
  (s log p + (1 - s) log(1 - p)). Ratings are on the Elo scale,
  rating = 1000 + 400 log10(e) (theta - theta_anchor): 400 points apart means odds of
  10 to 1. The anchor (the default SFT model) is 1000 in the fit and in every
  bootstrap replicate, so its interval is [1000, 1000] and the others' intervals
  are their distance from it.
- A weak Gaussian prior (ridge, RIDGE on every theta and on the length coefficient)
  keeps the fit finite where maximum likelihood is not: a model that won every
  vote, or a length difference that never varies. With tens of votes per model its
  pull is a fraction of a rating point. A model that won every vote gets a high but
  finite rating set by the prior, and its bootstrap interval is too narrow (every
  resample shows it winning too): read such a rating as "above the others".
- Models not connected to the anchor through votes (no chain of comparisons) get
  ratings the data cannot place against it; `Rating.connected` is False for them.
- Bootstrap 95% intervals resample the votes with replacement (percentiles 2.5 and
  97.5 of the refitted, re-anchored ratings). Every replicate is fitted at once by
  batched Newton steps: the raw fit works on counts per pair of models, the
  length-controlled one on the votes.
- Length control (as AlpacaEval 2): the same model plus beta * tanh(dlen / sd(dlen)),
  dlen the length difference of the two responses of a vote (sd: its root mean square,
  which does not depend on which side is a); the reported
  length-controlled ratings are the thetas, i.e. the length term set to zero. A
  policy that wins only by writing more rises in the raw ratings, not in these.
"""

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.learning_curve import Z95, wilson_interval

ELO_SCALE = 400 / np.log(10)  # Elo points per unit of log-odds
BASE_RATING = 1000.0  # the anchor's rating
RIDGE = 0.1  # Gaussian prior precision on each log-odds strength (sd ~3.2 = ~1370 Elo points)
N_BOOTSTRAP = 200  # resamples of the votes behind each interval
MAX_STEP = 2.0  # the largest change of any strength in one Newton step (log-odds): keeps far starts stable
_TOL = 1e-6  # Newton stops when no strength moves more than this (log-odds; 0.0004 Elo points)
_MAX_ITER = 100
_BLOCK = 64  # votes summed in float32 before the float64 sum per pair
_CHUNK_VALUES = 1_000_000  # votes x replicates fitted at once in the length-controlled bootstrap (memory)


@dataclass(frozen=True)
class WinRate:
    """One model's record against another; ties count half."""

    wins: int
    losses: int
    ties: int  # ties and "both bad"
    rate: float | None  # (wins + ties / 2) / votes; None without votes
    low: float  # Wilson 95% interval of the rate; (0, 1) without votes
    high: float

    @property
    def votes(self) -> int:
        return self.wins + self.losses + self.ties


def win_rate(wins: int, losses: int, ties: int, z: float = Z95) -> WinRate:
    """Win rate with ties counting half and its Wilson interval."""
    if min(wins, losses, ties) < 0:
        raise ValueError("wins, losses and ties must be >= 0")
    total = wins + losses + ties
    score = wins + ties / 2
    low, high = wilson_interval(score, total, z)
    return WinRate(wins, losses, ties, score / total if total else None, low, high)


@dataclass(frozen=True)
class Votes:
    """Pairwise votes as parallel arrays (one entry per vote).

    models: the key of each model (a registry id, a name), indexed by a and b;
    a, b: (N,) indices into models of the two sides, never equal;
    score: (N,) side a's score: 1 a better, 0 b better, 0.5 tie or both bad;
    length_a, length_b: (N,) response lengths (characters, tokens: one unit), or None.
    """

    models: tuple[Hashable, ...]
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray
    length_a: np.ndarray | None = None
    length_b: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.a)
        arrays = [self.b, self.score] + [x for x in (self.length_a, self.length_b) if x is not None]
        if any(len(x) != n for x in arrays):
            raise ValueError("a, b, score and lengths must have one entry per vote")
        if (self.length_a is None) != (self.length_b is None):
            raise ValueError("give both lengths or neither")
        if n and (min(self.a.min(), self.b.min()) < 0 or max(self.a.max(), self.b.max()) >= len(self.models)):
            raise ValueError("a and b must index models")
        if np.any(self.a == self.b):
            raise ValueError("a vote compares two different models")
        if not np.all(np.isin(self.score, (0.0, 0.5, 1.0))):
            raise ValueError("a vote's score is 1, 0 or 0.5")

    @classmethod
    def from_keys(cls, model_a: Sequence[Hashable], model_b: Sequence[Hashable], score: Sequence[float],
                  length_a: Sequence[float] | None = None, length_b: Sequence[float] | None = None) -> "Votes":
        """Votes from the models' keys per vote (all keys of one type: ints or strings)."""
        keys, index = np.unique(np.concatenate([np.asarray(model_a), np.asarray(model_b)]), return_inverse=True)
        n = len(model_a)
        lengths = [None if x is None else np.asarray(x, dtype=float) for x in (length_a, length_b)]
        return cls(tuple(keys.tolist()), index[:n], index[n:], np.asarray(score, dtype=float), *lengths)

    def __len__(self) -> int:
        return len(self.a)


def head_to_head(votes: Votes, x: Hashable, y: Hashable) -> WinRate:
    """x's record against y over the votes between them, from either side."""
    ix, iy = votes.models.index(x), votes.models.index(y)
    x_score = np.concatenate([votes.score[(votes.a == ix) & (votes.b == iy)],
                              1 - votes.score[(votes.a == iy) & (votes.b == ix)]])
    return win_rate(int((x_score == 1).sum()), int((x_score == 0).sum()), int((x_score == 0.5).sum()))


@dataclass(frozen=True)
class Rating:
    """One model on the leaderboard (Elo scale, the anchor at 1000)."""

    model: Hashable
    votes: int  # votes the model took part in
    rating: float  # Bradley-Terry maximum likelihood
    low: float  # bootstrap 95% interval
    high: float
    lc_rating: float | None  # length-controlled (length term set to zero); None without lengths
    lc_low: float | None
    lc_high: float | None
    connected: bool  # compared with the anchor through some chain of votes


@dataclass(frozen=True)
class Leaderboard:
    ratings: tuple[Rating, ...]  # best raw rating first
    anchor: Hashable | None  # the model at 1000; None: the mean rating is 1000
    votes: int
    n_bootstrap: int
    length_sd: float | None  # root mean square of the length difference, which normalises it
    length_effect: float | None  # P(a response one sd longer wins) between otherwise equal models

    def get(self, model: Hashable) -> Rating | None:
        return next((r for r in self.ratings if r.model == model), None)


def expit(x: np.ndarray) -> np.ndarray:
    """The logistic function; through tanh, which never overflows (and is fast in float32)."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


@dataclass(frozen=True)
class _Pairs:
    """The pairs of models that met: pair p is (ui[p], uj[p]) with ui < uj."""

    n_models: int
    ui: np.ndarray  # (P,)
    uj: np.ndarray  # (P,)

    @property
    def signed(self) -> np.ndarray:
        """(P, M): +1 at ui, -1 at uj, each pair's design row."""
        rows = np.zeros((len(self.ui), self.n_models))
        rows[np.arange(len(self.ui)), self.ui], rows[np.arange(len(self.ui)), self.uj] = 1.0, -1.0
        return rows


def _newton_step(pairs: _Pairs, signed: np.ndarray, theta: np.ndarray, resid: np.ndarray, curvature: np.ndarray,
                 ridge: float, length: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """One damped Newton step for R fits at once, from sums per pair: (R, K) with K = M (+ 1 with length).

    resid: (R, P) ui's score minus its expected score; curvature: (R, P) sum of p (1 - p);
    length: (beta (R,), its gradient (R,), (R, P) sum of p (1 - p) z, (R,) sum of p (1 - p) z^2).
    """
    R, M = theta.shape
    K = M + (length is not None)
    grad = np.empty((R, K))
    grad[:, :M] = resid @ signed - ridge * theta
    hess = np.zeros((R, K, K))  # minus the Hessian of the penalised log-likelihood
    hess[:, pairs.ui, pairs.uj] = hess[:, pairs.uj, pairs.ui] = -curvature
    hess[:, np.arange(M), np.arange(M)] = curvature @ np.abs(signed) + ridge
    if length is not None:
        beta, grad_beta, cross, curvature_beta = length
        grad[:, M] = grad_beta - ridge * beta
        hess[:, :M, M] = hess[:, M, :M] = cross @ signed
        hess[:, M, M] = curvature_beta + ridge
    step = np.linalg.solve(hess, grad[..., None])[..., 0]
    largest = np.abs(step).max(axis=1, keepdims=True)
    return step * np.minimum(1.0, MAX_STEP / np.maximum(largest, 1e-300))  # damped far from the optimum


def _fit_pairs(pairs: _Pairs, wins: np.ndarray, games: np.ndarray, theta: np.ndarray, ridge: float) -> np.ndarray:
    """Penalised Bradley-Terry fits of R data sets given as counts per pair.

    wins: (R, P) ui's score (wins + ties / 2); games: (R, P) votes; theta: (R, M) start.
    """
    signed, theta = pairs.signed, theta.copy()
    for _ in range(_MAX_ITER):
        p = expit(theta[:, pairs.ui] - theta[:, pairs.uj])  # (R, P)
        step = _newton_step(pairs, signed, theta, wins - games * p, games * p * (1 - p), ridge)
        theta += step
        if np.abs(step).max() < _TOL:
            break
    return theta


def _fit_votes(pairs: _Pairs, sizes: np.ndarray, score: np.ndarray, z: np.ndarray, weight: np.ndarray,
               theta: np.ndarray, beta: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Penalised Bradley-Terry fits with a length term, of R weightings of the same votes.

    The votes are sorted by pair, sizes: (P,) votes per pair; score: (G,) ui's score;
    z: (G,) normalised length difference ui minus uj; weight: (R, G) how often each vote
    is drawn (a bootstrap resample); theta: (R, M), beta: (R,) starts.
    Per-vote work is float32 and contiguous (sums per pair by reduceat); with
    t = tanh(logit / 2): p = (1 + t) / 2, s - p = (s - 1/2) - t / 2, p (1 - p) = (1 - t^2) / 4,
    so every sum that does not involve t is computed once, before the iterations.
    """
    pair = np.repeat(np.arange(len(sizes)), sizes)  # (G,) each vote's pair
    weight = weight.astype(np.float32)
    z = z.astype(np.float32)
    # Sums per pair in two levels: float32 over blocks of at most _BLOCK votes of one pair
    # (fast, and short enough to stay accurate), then float64 over each pair's blocks.
    pair_blocks = -(-sizes // _BLOCK)  # (P,) blocks per pair
    first_block = np.concatenate([[0], np.cumsum(pair_blocks)[:-1]])
    block_starts = (np.repeat(np.cumsum(sizes) - sizes, pair_blocks)
                    + _BLOCK * (np.arange(pair_blocks.sum()) - np.repeat(first_block, pair_blocks)))

    def per_pair(x):  # (R, G) -> (R, P) sums over each pair's votes
        return np.add.reduceat(np.add.reduceat(x, block_starts, axis=1).astype(np.float64), first_block, axis=1)

    wz = weight * z
    centred = (score - 0.5).astype(np.float32)
    score_sum = per_pair(weight * centred)  # sum w (s - 1/2)
    votes_sum = per_pair(weight)
    z_sum = per_pair(wz)
    score_z = per_pair(wz * centred).sum(axis=1)  # (R,) sum w (s - 1/2) z
    zz = per_pair(wz * z).sum(axis=1)  # (R,) sum w z^2
    signed, theta, beta = pairs.signed, theta.copy(), beta.copy()
    # (R, G) buffers used again at every iteration: a fresh array per operation costs more
    # in page faults than the arithmetic.
    t, wt, wtt, other = (np.empty(weight.shape, dtype=np.float32) for _ in range(4))
    previous = np.inf
    for _ in range(_MAX_ITER):
        half = (0.5 * (theta[:, pairs.ui] - theta[:, pairs.uj])).astype(np.float32)  # (R, P)
        np.take(half, pair, axis=1, out=t)  # half the log-odds of each vote
        np.multiply(z, (0.5 * beta).astype(np.float32)[:, None], out=other)
        t += other
        np.tanh(t, out=t)
        np.multiply(weight, t, out=wt)  # w t
        np.multiply(wt, t, out=wtt)  # w t^2
        resid, curvature = score_sum - 0.5 * per_pair(wt), 0.25 * (votes_sum - per_pair(wtt))
        np.multiply(wt, z, out=other)  # w t z
        grad_beta = score_z - 0.5 * other.sum(axis=1)  # (numpy sums a row pairwise: accurate in float32)
        np.multiply(wtt, z, out=other)  # w t^2 z
        cross = 0.25 * (z_sum - per_pair(other))
        other *= z  # w t^2 z^2
        curvature_beta = 0.25 * (zz - other.sum(axis=1))
        step = _newton_step(pairs, signed, theta, resid, curvature, ridge, (beta, grad_beta, cross, curvature_beta))
        theta += step[:, :-1]
        beta += step[:, -1]
        largest = np.abs(step).max()
        # Float32 votes: stop at the tolerance, or where the steps stop shrinking (rounding).
        if largest < _TOL or (largest < 1e-4 and largest >= previous):
            break
        previous = largest
    return theta, beta


def _connected(n_models: int, ui: np.ndarray, uj: np.ndarray, anchor: int | None) -> np.ndarray:
    """(M,) bool: reachable from the anchor (or, without one, in the largest component) through pairs."""
    reach = np.eye(n_models, dtype=np.int64)
    reach[ui, uj] = reach[uj, ui] = 1
    for _ in range(max(1, int(np.ceil(np.log2(max(n_models, 2)))))):  # squaring: paths of any length
        reach = np.minimum(reach @ reach, 1)
    if anchor is None:
        anchor = int(np.argmax(reach.sum(axis=1)))
    return reach[anchor] > 0


def _to_elo(theta: np.ndarray, anchor: int | None) -> np.ndarray:
    centre = theta[..., [anchor]] if anchor is not None else theta.mean(axis=-1, keepdims=True)
    return BASE_RATING + ELO_SCALE * (theta - centre)


def _interval(fits: np.ndarray, anchor: int | None) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.percentile(_to_elo(fits, anchor), [2.5, 97.5], axis=0)
    return low, high


def fit_leaderboard(votes: Votes, anchor: Hashable | None = None, n_bootstrap: int = N_BOOTSTRAP,
                    seed: int = 0, ridge: float = RIDGE) -> Leaderboard:
    """Bradley-Terry ratings (raw and, with lengths, length-controlled) with bootstrap intervals.

    anchor: the model rated 1000 (when it has no votes, the mean rating is 1000 instead).
    Raises ValueError for a negative n_bootstrap or ridge <= 0.
    """
    if n_bootstrap < 0 or ridge <= 0:
        raise ValueError("n_bootstrap must be >= 0 and ridge > 0")
    M, N = len(votes.models), len(votes)
    if N == 0:
        return Leaderboard((), None, 0, n_bootstrap, None, None)
    rng = np.random.default_rng(seed)
    # Orient every vote from its lower model index, and sort the votes by pair.
    flip = votes.a > votes.b
    lo, hi = np.where(flip, votes.b, votes.a), np.where(flip, votes.a, votes.b)
    codes, pair = np.unique(lo * M + hi, return_inverse=True)
    pairs = _Pairs(M, codes // M, codes % M)
    P = len(codes)
    order = np.argsort(pair, kind="stable")
    pair = pair[order]
    score = np.where(flip, 1 - votes.score, votes.score)[order]  # the lower index's score
    counts = np.bincount(np.concatenate([votes.a, votes.b]), minlength=M)  # votes per model
    anchor_index = votes.models.index(anchor) if anchor in votes.models else None
    if anchor_index is not None and counts[anchor_index] == 0:
        anchor_index = None
    connected = _connected(M, pairs.ui, pairs.uj, anchor_index)

    # 1. Raw: counts per (pair, outcome) are all the data; a resample of the votes is a
    #    multinomial draw of those counts.
    cells = np.bincount(pair * 3 + (2 * score).astype(np.int64), minlength=3 * P).reshape(1, P, 3).astype(float)

    def fit_cells(c, start):  # (R, P, 3) counts of loss, tie, win of ui
        return _fit_pairs(pairs, c[..., 2] + c[..., 1] / 2, c.sum(axis=-1), start, ridge)

    theta = fit_cells(cells, np.zeros((1, M)))
    raw = _to_elo(theta, anchor_index)[0]
    raw_low = raw_high = raw
    if n_bootstrap:
        resampled = rng.multinomial(N, cells.ravel() / N, size=n_bootstrap).reshape(n_bootstrap, P, 3)
        raw_low, raw_high = _interval(fit_cells(resampled.astype(float), np.repeat(theta, n_bootstrap, axis=0)),
                                      anchor_index)

    # 2. Length-controlled: per vote, beta * tanh(dlen / sd) beside the strengths.
    lc = lc_low = lc_high = None
    length_sd = length_effect = None
    if votes.length_a is not None:
        dlen = np.where(flip, votes.length_b - votes.length_a, votes.length_a - votes.length_b)[order]
        length_sd = float(np.sqrt(np.mean(dlen ** 2)))  # about 0 by symmetry: the same whichever side is a
        z = np.tanh(dlen / length_sd) if length_sd > 0 else np.zeros(N)
        sizes = np.bincount(pair, minlength=P)
        theta_lc, beta = _fit_votes(pairs, sizes, score, z, np.ones((1, N)), theta, np.zeros(1), ridge)
        lc = lc_low = lc_high = _to_elo(theta_lc, anchor_index)[0]
        length_effect = float(expit(beta[0] * np.tanh(1.0)))
        if n_bootstrap:
            chunk = max(1, min(n_bootstrap, _CHUNK_VALUES // N))
            fits = []
            for done in range(0, n_bootstrap, chunk):  # a loop over chunks of replicates, not over votes
                r = min(chunk, n_bootstrap - done)
                # How often each vote is drawn, one replicate at a time (a scatter into one
                # replicate's counts stays in cache; into all of them it would not).
                weight = np.empty((r, N), dtype=np.float32)
                for k in range(r):
                    weight[k] = np.bincount(rng.integers(0, N, N), minlength=N)
                fits.append(_fit_votes(pairs, sizes, score, z, weight, np.repeat(theta_lc, r, axis=0),
                                       np.repeat(beta, r), ridge)[0])
            lc_low, lc_high = _interval(np.concatenate(fits), anchor_index)

    def at(x, i):
        return None if x is None else float(x[i])

    ratings = [Rating(votes.models[i], int(counts[i]), float(raw[i]), float(raw_low[i]), float(raw_high[i]),
                      at(lc, i), at(lc_low, i), at(lc_high, i), bool(connected[i]))
               for i in range(M) if counts[i]]
    ratings.sort(key=lambda r: -r.rating)
    return Leaderboard(tuple(ratings), None if anchor_index is None else votes.models[anchor_index], N,
                       n_bootstrap, length_sd, length_effect)
