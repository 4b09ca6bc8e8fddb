"""Top-K compression of probability rows, the encoding of the pseudo-label file's rows.

Rows keep the top classes until the rest (the "tail") carries so little information that
spreading its mass evenly costs at most ``max_kl`` nats of KL(full || stored), and never
more than ``top_k`` classes. So a confident sample stores one or two numbers and a diffuse one
up to ``top_k``. Reading spreads the residual mass evenly over the classes a row does not
list (:func:`dense_from_topk`).

Precision: values below 0.5 keep ``mantissa_bits`` (6) of float16's 10 mantissa bits (relative
error < 1.6%, which costs ~1e-5..1e-4 nats and makes them compress); a value >= 0.5 keeps all
10, because its rounding error would otherwise swamp a tiny tail mass. Values are rounded
so that a row's stored sum never exceeds its true kept mass (see ``_round_to_mass``). With the
defaults (``max_kl`` 6e-4 per row) measured files are ~0.43-0.48x a float32 ``.npy`` of the
same probabilities at 10 classes and ~0.1x at 1,000, at a mean KL of ~4e-4..7e-4 nats
(``benchmarks/bench_label.py``).

Ground floor: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K_CAP = 1024
"""Default ``top_k``: every class up to this many; ``max_kl`` decides what a row keeps."""
DEFAULT_MAX_KL = 6e-4
"""Default per-sample KL budget (nats) for dropping the tail (and so a bound on the mean)."""
FULL_PRECISION_ABOVE = 0.5
"""Values from here up keep all 10 float16 mantissa bits."""
DEFAULT_MANTISSA_BITS = 6
"""float16 mantissa bits kept below 0.5: relative error < 2**-6, KL cost ~5e-5 nats."""
GREEDY_COLUMNS = 16
"""Largest values rounded one at a time in ``_round_to_mass``; the rest vectorised."""


def default_top_k(num_classes: int) -> int:
    """All classes up to ``TOP_K_CAP``."""
    return min(num_classes, TOP_K_CAP)


@dataclass
class CompressedRows:
    """A batch of probabilities in the file's row encoding (ragged top-k lists).

    Attributes:
        label: int64 [B] argmax class.
        counts: int64 [B] classes kept per row (1..top_k).
        idx: int64 [sum(counts)] kept class indices, row after row, most probable first.
        prob: float16 [sum(counts)] their probabilities.
    """

    label: np.ndarray
    counts: np.ndarray
    idx: np.ndarray
    prob: np.ndarray


def compress_probs(
    probs: np.ndarray,
    top_k: int,
    max_kl: float = DEFAULT_MAX_KL,
    mantissa_bits: int = DEFAULT_MANTISSA_BITS,
) -> CompressedRows:
    """Keep, per row, the fewest top classes whose even-tail reconstruction is within max_kl.

    With the classes sorted by probability ``p_1 >= ... >= p_C`` and ``k`` kept, the stored
    distribution gives each of the ``C - k`` others ``r_k / (C - k)`` with ``r_k`` the tail
    mass, so KL(p || q_k) = sum_{i>k} p_i log p_i - r_k log(r_k / (C - k)), computed for
    every ``k`` at once from reverse cumulative sums.

    Args:
        probs: float [B, C] probabilities (rows sum to 1).
        top_k: most classes kept per row.
        max_kl: per-row KL budget in nats; 0 keeps exactly ``top_k``.
        mantissa_bits: float16 mantissa bits kept (10 = full float16).

    Returns:
        The rows in ragged form.
    """
    probs = np.asarray(probs, dtype=np.float64)
    # float32 teacher outputs sum to 1 only within ~1e-7; the tail arithmetic needs exact.
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-300)
    batch, num_classes = probs.shape
    top_k = max(1, min(int(top_k), num_classes))
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=1)
    if max_kl > 0 and top_k > 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(sorted_p > 0, sorted_p * np.log(sorted_p), 0.0)
        # tail_*[:, k] = sums over sorted positions k..C-1 (the tail when k classes are kept).
        tail_mass = np.cumsum(sorted_p[:, ::-1], axis=1)[:, ::-1]
        tail_plogp = np.cumsum(plogp[:, ::-1], axis=1)[:, ::-1]
        kept = np.arange(1, top_k + 1)
        mass = np.clip(tail_mass[:, kept[kept < num_classes]], 0.0, None)
        spread = num_classes - kept[kept < num_classes]
        with np.errstate(divide="ignore", invalid="ignore"):
            even = np.where(mass > 0, mass * np.log(mass / spread), 0.0)
        kl = tail_plogp[:, kept[kept < num_classes]] - even
        if kl.shape[1] < top_k:  # keeping every class is exact
            kl = np.concatenate([kl, np.zeros((batch, 1))], axis=1)
        within = kl <= max_kl
        within[:, -1] = True
        counts = np.argmax(within, axis=1) + 1
    else:
        counts = np.full(batch, top_k)
    width = int(counts.max())  # float16 conversion is slow: only the columns any row keeps
    head = round_down_float16(sorted_p[:, :width], mantissa_bits)
    # A probability that underflows float16 joins the tail instead of being stored as 0,
    # which would give it zero mass (infinite KL) on reading.
    counts = np.maximum(np.minimum(counts, (head > 0).sum(axis=1)), 1)
    mask = np.arange(width)[None, :] < counts[:, None]
    tail_mass = 1.0 - np.where(mask, sorted_p[:, :width], 0.0).sum(axis=1)
    head = _round_to_mass(head, mask, 1.0 - tail_mass, mantissa_bits)
    return CompressedRows(
        label=order[:, 0].astype(np.int64),
        counts=counts.astype(np.int64),
        idx=order[:, :width][mask].astype(np.int64),
        prob=head[mask],
    )


def _round_to_mass(
    down: np.ndarray, mask: np.ndarray, target: np.ndarray, mantissa_bits: int
) -> np.ndarray:
    """Round some rounded-down values up one grid step so each row's sum nears ``target``.

    The reader gives the unlisted classes ``1 - sum(stored)``: if every value were rounded
    down, that residual would exceed the true tail mass by up to 2**-mantissa_bits of the
    head's mass, and KL grows with that excess when the true tail is tiny. Going from the
    largest value to the smallest (the first ``GREEDY_COLUMNS`` one by one, the rest in one
    vectorised pass from the smallest up), a value is rounded up while the row's deficit
    allows it, so the sum never exceeds ``target`` and ends close below it.
    """
    step_bits = np.where(down < FULL_PRECISION_ABOVE, 1 << (10 - mantissa_bits), 1)
    up = (down.view(np.uint16) + step_bits.astype(np.uint16)).view(np.float16)
    steps = np.where(mask, up.astype(np.float64) - down.astype(np.float64), np.inf)
    out = down.copy()
    deficit = target - np.where(mask, down.astype(np.float64), 0.0).sum(axis=1)
    # The few largest values one by one (their big steps absorb the big errors) ...
    head = min(GREEDY_COLUMNS, down.shape[1])
    for column in range(head):
        take = steps[:, column] <= deficit
        out[take, column] = up[take, column]
        deficit = deficit - np.where(take, steps[:, column], 0.0)
    # ... then the many small ones at once, smallest first, while their steps fit.
    tail = steps[:, head:][:, ::-1]
    take = np.cumsum(np.where(np.isfinite(tail), tail, 0.0), axis=1) <= deficit[:, None]
    take &= np.isfinite(tail)
    out[:, head:] = np.where(take[:, ::-1], up[:, head:], out[:, head:])
    return out


def round_down_float16(values: np.ndarray, mantissa_bits: int = 10) -> np.ndarray:
    """float16 values never above the input, keeping ``mantissa_bits`` of the 10.

    Rounding to nearest could push a row's stored sum past 1 and leave no residual mass for
    the tail classes (zero probability, infinite KL); truncating keeps the residual >= the
    true tail mass. Zeroing low mantissa bits (relative error < 2**-mantissa_bits) makes
    the values compress: KL grows only with the square of the relative error.
    """
    rounded = values.astype(np.float16)
    over = rounded.astype(np.float64) > values
    rounded[over] = np.nextafter(rounded[over], np.float16(0))
    if mantissa_bits < 10:
        bits = rounded.view(np.uint16)
        coarse = values < FULL_PRECISION_ABOVE
        bits[coarse] &= np.uint16((0xFFFF << (10 - mantissa_bits)) & 0xFFFF)
    return rounded


def dense_from_topk(topk_idx: np.ndarray, topk_prob: np.ndarray, num_classes: int) -> np.ndarray:
    """Rebuild float32 [N, C] probabilities from padded top-k rows (idx -1 = padding).

    The mass a row does not list is spread evenly over its unlisted classes; rows are
    renormalised so float16 rounding never leaves them summing above 1.
    """
    n = topk_idx.shape[0]
    dense = np.zeros((n, num_classes), dtype=np.float64)
    valid = topk_idx >= 0
    rows = np.broadcast_to(np.arange(n)[:, None], topk_idx.shape)
    dense[rows[valid], topk_idx[valid]] = topk_prob[valid].astype(np.float64)
    listed = valid.sum(axis=1)
    residual = np.clip(1.0 - dense.sum(axis=1), 0.0, None)
    unlisted = num_classes - listed
    # A floor keeps every unlisted class possible (finite KL) when rounding left no residual.
    share = np.where(unlisted > 0, np.maximum(residual / np.maximum(unlisted, 1), 1e-12), 0.0)
    is_unlisted = np.ones((n, num_classes), dtype=bool)
    is_unlisted[rows[valid], topk_idx[valid]] = False
    dense += is_unlisted * share[:, None]
    dense /= np.maximum(dense.sum(axis=1, keepdims=True), 1e-12)
    return dense.astype(np.float32)


def rows_problem(label, offsets, flat_idx, flat_prob, num_classes: int) -> str | None:
    """What no writer of this encoding produces in these rows, as a message, or None.

    Args:
        label: int [N] argmax class per row.
        offsets: int [N + 1]; row i's entries are ``offsets[i]:offsets[i + 1]``.
        flat_idx, flat_prob: int [M] class indices and float16 [M] probabilities.

    Refused: class indices or labels outside the classes; probabilities that are NaN,
    infinite, negative or above 1; rows that list no class or sum above 1 (beyond float16
    rounding). Such values would train a NaN model without any error.
    """
    if len(flat_idx) and (flat_idx.min() < 0 or flat_idx.max() >= num_classes):
        return f"class index outside 0..{num_classes - 1}; the file is corrupt"
    if len(label) and (label.min() < 0 or label.max() >= num_classes):
        return f"label outside 0..{num_classes - 1}; the file is corrupt"
    counts = np.diff(offsets)
    values = flat_prob.astype(np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        position = int(np.argmax(bad))
        row = int(np.searchsorted(offsets, position, side="right") - 1)
        return (
            f"row {row + 1} holds the probability {values[position]!r} (NaN, infinite, "
            "negative or above 1); the file is corrupt, relabel with `zmdevice label`"
        )
    if len(counts) and counts.min() < 1:
        return f"row {int(np.argmin(counts)) + 1} lists no class; the file is corrupt, relabel"
    sums = np.add.reduceat(values, offsets[:-1]) if len(values) else np.zeros(0)
    if len(sums) and sums.max() > 1.01:
        row = int(np.argmax(sums))
        return (
            f"the probabilities of row {row + 1} sum to {sums[row]:.3f}, more than 1; "
            "the file is corrupt, relabel with `zmdevice label`"
        )
    return None
