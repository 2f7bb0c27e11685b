"""Is a reward model short of data, of label quality, or of settings? The figures
that tell: a 95% interval on its validation accuracy, its learning curve (accuracy
against the number of training rankings) and the labelers' own agreement, read
together into one sentence. Pure functions, no torch: the web app imports them too.

The labelers' pairwise agreement is the practical ceiling (InstructGPT compares its
reward models with it): two labelers who each follow the true preference with
probability p agree on p^2 + (1 - p)^2 of pairs, so a model that learnt the true
preference can beat the agreement by a few points, not by many.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959964  # the normal quantile of a two-sided 95% interval
WIDE_INTERVAL = 0.10  # half-width above which the page warns that the validation set is too small
CLOSE_TO_CEILING = 0.05  # within this many points of the labelers' agreement: the labels are the limit
RISING = 0.02  # accuracy gained on the last doubling of the data that still counts as rising
MIN_POINTS = 3


def wilson_interval(correct: float, total: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/total: (low, high), (0, 1) without data.
    correct may be fractional (a win rate counts a tie as half a win)."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # At p = 0 or 1 one end is exactly 0 or 1; floating point would leave it a hair inside.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class CurvePoint:
    rankings: int  # training rankings (annotations) the point was fitted on
    pairs: int  # their comparisons
    val_accuracy: float


def verdict(points: Sequence[CurvePoint], ceiling: float | None, final_accuracy: float | None = None,
            val_pairs: int | None = None) -> str:
    """One sentence on what would improve the reward model most.

    points: the learning curve, fewest rankings first; ceiling: the labelers' pairwise
    agreement on the same data (None when no prompt was ranked by two labelers);
    final_accuracy: the trained model's validation accuracy, when it beats the curve's
    last point (the curve is fitted with cheap settings); val_pairs: the validation
    pairs every point is measured on (with too few, the curve's steps are noise).
    """
    points = sorted(points, key=lambda p: p.rankings)
    if len(points) < MIN_POINTS or points[0].rankings == points[-1].rankings:
        return ("Too few points for a learning curve: label more prompts before reading anything into the"
                " accuracy.")
    if val_pairs is not None:
        low, high = wilson_interval(round(points[-1].val_accuracy * val_pairs), val_pairs)
        if (high - low) / 2 > WIDE_INTERVAL:
            return (f"Too few validation pairs ({val_pairs}) to read the learning curve: its steps are within"
                    " the noise. Label more prompts, some of them in the validation split.")
    best = max(points[-1].val_accuracy, final_accuracy if final_accuracy is not None else 0.0)
    gain = points[-1].val_accuracy - points[-2].val_accuracy  # over the last doubling of the data
    rising = gain >= RISING
    if ceiling is not None and best >= ceiling - CLOSE_TO_CEILING:
        return (f"Close to the labelers' agreement ({best:.0%} against {ceiling:.0%}): improve the labels or the"
                " instructions; more labels of the same quality will not help much.")
    if rising:
        where = f" (the labelers agree on {ceiling:.0%})" if ceiling is not None else ""
        return (f"Accuracy still rising (+{gain * 100:.0f} points on the last doubling of the data): label more"
                f" prompts{where}.")
    if ceiling is None:
        return ("Accuracy no longer rises with more data, and no prompt was ranked by two labelers to compare"
                " with: label some prompts with overlap to know whether the labels or the settings hold it back.")
    return (f"Flat well below the labelers' agreement ({best:.0%} against {ceiling:.0%}): more data of the same"
            " kind will not help much; try other settings (learning rate, epochs) or a larger base model.")


def interval_is_wide(metrics: dict) -> bool:
    """True when a reward model's stored validation interval is wider than +-WIDE_INTERVAL."""
    low, high = metrics.get("val_accuracy_low"), metrics.get("val_accuracy_high")
    return low is not None and high is not None and (high - low) / 2 > WIDE_INTERVAL
