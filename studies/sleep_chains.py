"""How much of the 1D pretext can be read off a 30-s epoch with no position information (README, sleep).

Windows of 1 s start uniformly in [0, 29 s]; two windows overlap when their starts are < 1 s apart, and
overlapping windows chain into groups. Without positions, only the offset of two windows in one chain
can be determined from content (by matching the overlaps, hop by hop); every other pair is at best
guessed as 0. Monte Carlo over 4000 epochs:

    python studies/sleep_chains.py
"""

import numpy as np


def chains(N, T=3000, w=100, reps=4000, seed=0):
    """-> share of ordered pairs overlapping directly, share in one chain, share of the zero predictor's
    squared error on pairs in one chain (what could be learned at best), mean chains per epoch."""
    rng = np.random.default_rng(seed)
    direct = same = determinable = count = 0.0
    for _ in range(reps):
        t = np.sort(rng.uniform(0, T - w, N))
        chain = np.concatenate([[0], np.cumsum(np.diff(t) >= w)])  # a new chain after each gap
        shift = np.abs(t[:, None] - t[None, :]) / w  # |dt| in windows
        other = ~np.eye(N, dtype=bool)
        together = chain[:, None] == chain[None, :]
        direct += ((shift < 1) & other).sum() / N**2
        same += (together & other).sum() / N**2
        determinable += (shift**2 * together).sum() / (shift**2).sum()
        count += chain[-1] + 1
    return direct / reps, same / reps, determinable / reps, count / reps


if __name__ == "__main__":
    for n in (40, 120):
        d, s, m, c = chains(n)
        print(
            f"{n} windows: {d:.1%} of ordered pairs overlap directly, {s:.1%} lie in one chain, "
            f"{m:.2%} of the zero predictor's MSE is determinable, {c:.1f} chains per epoch"
        )
