"""Running activation statistics and the three ways of turning them into an int8 range (amax).

One `RunningStats` per tensor, updated one batch at a time, so calibration memory does not grow with
the number of images: min, max, max|x| and a fixed-size histogram of |x|. When a batch exceeds the
histogram's range, the range grows by a power of two and old bins merge exactly (2^k neighbours into
one), in the spirit of TensorRT's and ONNX Runtime's histogram collectors.

    minmax      amax = max|x|
    percentile  amax = the PERCENTILE-th percentile of |x| (read off the histogram)
    entropy     amax = the clip point whose 128-level quantized histogram is closest (KL divergence)
                to the clipped original: TensorRT's EntropyCalibration2 as published in NVIDIA's
                pytorch-quantization (`_compute_amax_entropy`)

numpy only: no torch, no onnx.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ("entropy", "minmax", "percentile")
NUM_BINS = 2048  # |x| histogram bins, as TensorRT's and ORT's entropy calibrators use
PERCENTILE = 99.99
QUANT_BINS = 128  # int8 symmetric: |q| in 0..127 -> 128 levels
ENTROPY_START_BIN = 128  # the smallest clip point tried is 128 bins (TensorRT / pytorch-quantization)


class RunningStats:
    """min, max, max|x|, element count and a histogram of |x| over [0, hist_max], merged batch by batch."""

    def __init__(self, bins: int = NUM_BINS):
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2 (exact re-binning), got {bins}")
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.hist = np.zeros(bins, np.int64)
        self.hist_max = 0.0  # upper edge of the last bin; 0 while every value seen was 0

    @property
    def absmax(self) -> float:
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    @property
    def bin_width(self) -> float:
        return self.hist_max / self.bins

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("non-finite values (NaN or Inf) in the activations")
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += x.size
        a = np.abs(x)
        amax = max(-lo, hi, 0.0)
        if amax > self.hist_max:
            self._grow(amax)
        if self.hist_max == 0.0:  # everything so far is exactly 0
            self.hist[0] += a.size
            return
        idx = (a * np.float32(self.bins / self.hist_max)).astype(np.int64)  # bin of each |x|
        np.minimum(idx, self.bins - 1, out=idx)  # |x| == hist_max lands in the last bin
        self.hist += np.bincount(idx, minlength=self.bins)

    def _grow(self, amax: float) -> None:
        if self.hist_max == 0.0:  # first non-zero data: old counts (all zeros) stay in bin 0
            self.hist_max = amax
            return
        factor = 1
        while self.hist_max * factor < amax:
            factor *= 2
        if factor >= self.bins:
            merged = np.zeros(self.bins, np.int64)
            merged[0] = self.hist.sum()
        else:
            merged = np.zeros(self.bins, np.int64)
            merged[: self.bins // factor] = self.hist.reshape(self.bins // factor, factor).sum(axis=1)
        self.hist, self.hist_max = merged, self.hist_max * factor


def amax_minmax(stats: RunningStats) -> float:
    return stats.absmax


def amax_percentile(stats: RunningStats, percentile: float = PERCENTILE) -> float:
    """Upper edge of the bin where the cumulative |x| count reaches `percentile` %, capped at max|x|."""
    total = int(stats.hist.sum())
    if total == 0 or stats.hist_max == 0.0:
        return stats.absmax
    cdf = np.cumsum(stats.hist)
    i = int(np.searchsorted(cdf, percentile / 100.0 * total, side="left"))
    return min((i + 1) * stats.bin_width, stats.absmax)


def amax_entropy(stats: RunningStats, quant_bins: int = QUANT_BINS, start_bin: int = ENTROPY_START_BIN) -> float:
    """TensorRT's entropy calibration on the |x| histogram, capped at max|x|."""
    if stats.hist_max == 0.0 or stats.hist.sum() == 0:
        return stats.absmax
    i = entropy_clip_bin(stats.hist, quant_bins, start_bin)
    return min(i * stats.bin_width, stats.absmax)


def entropy_clip_bin(hist: np.ndarray, quant_bins: int = QUANT_BINS, start_bin: int = ENTROPY_START_BIN) -> int:
    """The number of histogram bins i (clip at bin edge i) with the least KL(P_i || Q_i); ties pick
    the largest i, as the reference does."""
    candidates, kl = entropy_divergences(hist, quant_bins, start_bin)
    return int(candidates[len(kl) - 1 - int(np.argmin(kl[::-1]))])


def entropy_divergences(hist: np.ndarray, quant_bins: int = QUANT_BINS,
                        start_bin: int = ENTROPY_START_BIN) -> tuple[np.ndarray, np.ndarray]:
    """(candidate clip bins i, KL(P_i || Q_i) for each), i from start_bin to len(hist).

    P_i: hist[:i], with the clipped tail (everything from bin i on) added to its last bin.
    Q_i: hist[:i] merged into `quant_bins` groups (bin j in group floor(quant_bins·j / i)), each
         group's count spread evenly over its non-empty bins; empty bins stay empty.
    As in the reference, bin 0 is first replaced by bin 1 (|x| ≈ 0 is over-represented), and a
    candidate where P has mass that Q lacks (tail beyond an empty last bin) scores +inf.

    Closed form, O(len(hist) · quant_bins) instead of the reference's O(len(hist)²): with T the
    total, S_g / n_g a group's count / non-empty bins, a_g = S_g / n_g, and h = hist,
      T·KL_i = Σ_{j<i-1} h_j log(h_j/T) − Σ_{j<i-1} h_j log(a_g(j)) + csum(i-1)·log(csum(i))
               + p_last·(log(p_last/T) − log(a_last) + log(csum(i)))
    where Σ_{j<i-1} h_j log a_g(j) = Σ_g S_g log a_g − h_{i-1} log a_last.
    """
    h = np.asarray(hist, dtype=np.float64).copy()
    n = h.size
    if n < 2:
        return np.array([n]), np.zeros(1)
    h[0] = h[1]
    start_bin = min(max(start_bin, 1), n)
    total = h.sum()
    nz = h > 0
    csum = np.concatenate([[0.0], np.cumsum(h)])  # csum[k] = sum h[:k]
    cnz = np.concatenate([[0], np.cumsum(nz)])  # non-empty bins in h[:k]
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(nz, h * np.log(h / total), 0.0)
    plogp = np.concatenate([[0.0], np.cumsum(hlogh)])  # Σ_{j<k} h_j log(h_j/T)
    i = np.arange(start_bin, n + 1)  # (C,) candidate clip bins
    g = np.arange(quant_bins + 1)
    bounds = (g[None, :] * i[:, None] + quant_bins - 1) // quant_bins  # (C, Q+1): first bin of each group
    grp_sum = csum[bounds[:, 1:]] - csum[bounds[:, :-1]]  # (C, Q)
    grp_nz = cnz[bounds[:, 1:]] - cnz[bounds[:, :-1]]  # (C, Q)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_avg = np.where(grp_nz > 0, np.log(grp_sum / grp_nz), 0.0)  # (C, Q); unused where S_g = 0
        last = i - 1
        h_last = h[last]
        log_a_last = log_avg[:, -1]  # bin i-1 is always in the last group
        cross = (grp_sum * log_avg).sum(axis=1) - np.where(h_last > 0, h_last * log_a_last, 0.0)
        log_q_total = np.log(csum[i])
        body = plogp[last] - cross + csum[last] * log_q_total
        p_last = h_last + (total - csum[i])
        tail_term = np.where(p_last > 0, p_last * (np.log(p_last / total) - log_a_last + log_q_total), 0.0)
        kl = (body + tail_term) / total
    kl[(p_last > 0) & (h_last == 0)] = math.inf  # Q is empty where P has the tail
    kl[~np.isfinite(kl)] = math.inf  # no data below the clip point at all: never the best
    return i, kl


AMAX_FUNCTIONS = {"minmax": amax_minmax, "percentile": amax_percentile, "entropy": amax_entropy}


def compute_amax(stats: RunningStats, method: str) -> float:
    return AMAX_FUNCTIONS[method](stats)
