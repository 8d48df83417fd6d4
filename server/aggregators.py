"""Robust aggregation of silos' updates as pure functions: FedAvg, median, trimmed mean, Krum, norm bounding.

An update is a mapping of parameter name to array (``dict[str, numpy.ndarray]``);
every update of a round has the same names and shapes. Where a function measures an
update's size or a distance between updates, it is the L2 norm of all entries of the
update together (the flattened update), as in :mod:`common.privacy.clipping`.

These functions know nothing of Flower; a strategy turns its replies into updates and
calls them. Each validates its inputs and raises ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
from numpy.typing import NDArray

# Parameter name -> array; any floating dtype is accepted and computed in float64.
Update = Mapping[str, NDArray[np.floating[Any]]]

# Names accepted by :func:`sensitivity` (kebab-case, as config values).
AGGREGATORS = ("mean", "weighted-mean", "norm-bounded-mean", "median", "trimmed-mean", "krum", "multi-krum")


def weighted_mean(updates: Sequence[Update], weights: Sequence[float]) -> dict[str, NDArray[np.float64]]:
    """Weighted mean of the updates, parameter by parameter (FedAvg).

    Parameters
    ----------
    updates : Sequence[Mapping[str, numpy.ndarray]]
        One update per silo: parameter name to array, the same names and shapes in
        every update, finite floating-point values.
    weights : Sequence[float]
        One weight per update (FedAvg: the silo's number of training examples);
        finite, >= 0, not all zero. Only their ratios matter.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``sum_i weights[i] * updates[i][name] / sum_i weights[i]`` for every name,
        float64, in the parameter order of ``updates[0]``.

    Raises
    ------
    ValueError
        If ``updates`` is empty, the updates differ in names or shapes, an array is
        not floating point or holds NaN/inf, or ``weights`` has the wrong length, a
        negative, non-finite or boolean entry, or sums to zero.

    Notes
    -----
    FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
    from Decentralized Data", https://arxiv.org/abs/1602.05629. The same formula as
    Flower's ``aggregate_arrayrecords`` (weights normalised by their total), computed
    in float64 whatever the input dtype. One silo
    can move the result arbitrarily far: the mean is not robust.
    """
    stacked = _stack(updates)
    factors = _check_weights(weights, len(updates))
    factors = factors / factors.sum()  # (n,)
    # (n,) · (n, *shape) -> (*shape)
    return {name: np.tensordot(factors, values, axes=1) for name, values in stacked.items()}


def coordinate_median(updates: Sequence[Update]) -> dict[str, NDArray[np.float64]]:
    """Coordinate-wise median of the updates (unweighted).

    Parameters
    ----------
    updates : Sequence[Mapping[str, numpy.ndarray]]
        One update per silo (same names and shapes, finite floating-point values).

    Returns
    -------
    dict[str, numpy.ndarray]
        For every entry of every parameter, the median of the silos' values; with an
        even number of updates, the mean of the two middle values (as
        ``numpy.median``). float64.

    Raises
    ------
    ValueError
        If ``updates`` is empty, the updates differ in names or shapes, or an array is
        not floating point or holds NaN/inf.

    Notes
    -----
    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", https://arxiv.org/abs/1803.01498 (coordinate-wise median).
    While fewer than half of the updates are Byzantine, every entry stays within the
    range of the honest silos' values. Silos' weights are ignored, as in Yin et al.
    and Flower's ``FedMedian``: a weight is a claim by the silo and would let one silo
    dominate.
    The result need not be any silo's update, and its norm can exceed every input's.
    """
    stacked = _stack(updates)
    return {name: np.asarray(np.median(values, axis=0), dtype=np.float64) for name, values in stacked.items()}


def trimmed_mean(updates: Sequence[Update], beta: float) -> dict[str, NDArray[np.float64]]:
    """Coordinate-wise trimmed mean: drop the ⌊β·n⌋ largest and smallest values, average the rest.

    Parameters
    ----------
    updates : Sequence[Mapping[str, numpy.ndarray]]
        One update per silo (same names and shapes, finite floating-point values).
    beta : float
        Fraction trimmed from each end, ``0 <= beta < 0.5``. ``n - 2⌊β·n⌋ >= 1``
        values always remain, because ``⌊β·n⌋ <= β·n < n/2``. ``beta = 0`` is the
        unweighted mean.

    Returns
    -------
    dict[str, numpy.ndarray]
        For every entry, the mean of the ``n - 2⌊β·n⌋`` middle values of the silos'
        values. float64.

    Raises
    ------
    ValueError
        If ``updates`` is empty, the updates differ in names or shapes, an array is
        not floating point or holds NaN/inf, or ``beta`` is boolean, non-finite or
        outside ``[0, 0.5)``.

    Notes
    -----
    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", https://arxiv.org/abs/1803.01498 (coordinate-wise trimmed
    mean). Unweighted, like the paper. While at most ``⌊β·n⌋`` updates are
    Byzantine, every entry stays within the range of the honest silos' values.

    The same semantics as Flower 1.42's ``FedTrimmedAvg`` (its ``trim_mean``): the
    cut per side is ``int(beta * n)`` computed in floating point, the remaining
    values are averaged without weights, parameter by parameter. fedrec differs only
    in validation: Flower does not check values, and ``numpy.partition`` sorts NaN
    last, so a silo's NaN is silently trimmed away when it falls in the cut and
    poisons the result when it does not; here any NaN/inf is an error, and a
    malformed input raises ``ValueError`` rather than Flower's ``AggregationError``
    (a pure function knows no strategy).
    """
    _check_fraction("beta", beta)
    stacked = _stack(updates)
    n = len(updates)
    cut = int(beta * n)  # ⌊β·n⌋ for β >= 0, the same float product as Flower
    result: dict[str, NDArray[np.float64]] = {}
    for name, values in stacked.items():
        # Only the order statistics at the cut points are needed, not a full sort.
        part = np.partition(values, (cut, n - cut - 1), axis=0)  # (n, *shape)
        result[name] = np.asarray(part[cut : n - cut].mean(axis=0), dtype=np.float64)
    return result


def krum_scores(updates: Sequence[Update], num_malicious: int) -> NDArray[np.float64]:
    """Krum score of every update: summed squared distances to its n - f - 2 nearest others.

    Parameters
    ----------
    updates : Sequence[Mapping[str, numpy.ndarray]]
        One update per silo (same names and shapes, finite floating-point values).
    num_malicious : int
        ``f``, the number of Byzantine silos tolerated; ``n >= 2f + 3``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n,)``: ``score[i]`` is the sum of the ``n - f - 2`` smallest squared
        L2 distances from update ``i`` (flattened over all parameters) to the other
        updates. Lower is more central.

    Raises
    ------
    ValueError
        If the updates are invalid (see :func:`weighted_mean`), ``num_malicious`` is
        not an integer >= 0, or ``n < 2 * num_malicious + 3``.

    Notes
    -----
    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent" (NeurIPS), https://arxiv.org/abs/1703.02757; their guarantee
    needs ``2f + 2 < n``. Distances are computed from differences ``x_i - x_j``, not
    from Flower's ``|x|² + |y|² - 2x·y``, which cancels catastrophically for nearby
    large updates (and can make a self-distance nonzero or a distance negative); on
    well-separated inputs the two agree.
    """
    return _krum_scores(_stack(updates), num_malicious)


def multi_krum(
    updates: Sequence[Update], num_malicious: int, num_selected: int
) -> tuple[dict[str, NDArray[np.float64]], list[int]]:
    """Multi-Krum: the unweighted mean of the ``num_selected`` updates with the lowest Krum scores.

    Parameters
    ----------
    updates : Sequence[Mapping[str, numpy.ndarray]]
        One update per silo (same names and shapes, finite floating-point values).
    num_malicious : int
        ``f``, the number of Byzantine silos tolerated; ``n >= 2f + 3``.
    num_selected : int
        ``m``, how many updates to average, ``1 <= m <= n``. ``m = 1`` is Krum;
        ``m = n - f`` averages as many updates as there are honest silos when
        ``f`` are Byzantine; with ``m > n - f`` and ``f`` Byzantine silos present, at
        least one of them is always selected.

    Returns
    -------
    tuple[dict[str, numpy.ndarray], list[int]]
        The mean of the selected updates (float64) and their indices into
        ``updates``, by increasing score, equal scores by increasing index.

    Raises
    ------
    ValueError
        If the updates are invalid (see :func:`weighted_mean`), ``num_malicious`` is
        not an integer >= 0, ``n < 2 * num_malicious + 3``, or ``num_selected`` is not
        an integer in ``[1, n]``.

    Notes
    -----
    Krum and Multi-Krum: Blanchard et al. 2017, https://arxiv.org/abs/1703.02757;
    see also El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning
    in Byzantium" (ICML), https://arxiv.org/abs/1802.07927, on Krum's weakness in
    high dimension and Multi-Krum as Bulyan's first step.

    Selection is Flower 1.42's ``select_multikrum``: the same scores over the same
    ``n - f - 2`` neighbours (distances computed from differences, see
    :func:`krum_scores`). Differences, and why:

    * the selected updates are averaged *without* weights, as in the papers.
      Flower's ``MultiKrum`` weights them by each reply's ``num-examples``, a number
      the silo reports itself: a selected Byzantine silo could claim a huge count
      and dominate the mean that selection was meant to protect;
    * ties are broken by index (stable sort); Flower's ``numpy.argsort`` default
      sort is not stable, so its choice among equal scores is unspecified;
    * ``n >= 2f + 3`` is required; Flower silently uses ``max(1, n - f - 2)``
      neighbours and accepts any ``n``.
    """
    stacked = _stack(updates)
    scores = _krum_scores(stacked, num_malicious)
    _check_int_in_range("num_selected", num_selected, 1, len(updates))
    order = np.argsort(scores, kind="stable")[:num_selected]
    selected = [int(i) for i in order]
    mean = {name: np.asarray(values[selected].mean(axis=0), dtype=np.float64) for name, values in stacked.items()}
    return mean, selected


def norm_bounded_mean(
    updates: Sequence[Update], weights: Sequence[float], bound: float
) -> tuple[dict[str, NDArray[np.float64]], list[float]]:
    """Weighted mean after scaling every update down to L2 norm at most ``bound``.

    Parameters
    ----------
    updates : Sequence[Mapping[str, numpy.ndarray]]
        One update per silo (same names and shapes, finite floating-point values).
    weights : Sequence[float]
        One weight per update; finite, >= 0, not all zero.
    bound : float
        ``M > 0``: each update ``x`` becomes ``x * min(1, M / |x|)``, ``|x|`` the L2
        norm of the whole flattened update (every parameter scaled by one factor).

    Returns
    -------
    tuple[dict[str, numpy.ndarray], list[float]]
        The weighted mean of the bounded updates (float64), and every update's
        original L2 norm, in input order (for logging and for choosing ``M``).

    Raises
    ------
    ValueError
        If the updates or weights are invalid (see :func:`weighted_mean`) or
        ``bound`` is boolean, non-finite or <= 0.

    Notes
    -----
    Norm thresholding against backdoors: Sun et al. 2019, "Can You Really Backdoor
    Federated Learning?", https://arxiv.org/abs/1911.07963. The scaling is that of
    DP-FedAvg's clipping (:func:`common.privacy.clipping.clip_update`), except that
    the factor is exactly ``M / |x|`` (``clip_update`` divides by ``|x| + 1e-12``);
    an update with norm ``<= M``, the all-zero one included, is left as it is. This bounds each silo's
    pull on the result by ``weights[i] / sum(weights) * M``; it is not a privacy
    mechanism by itself (see :func:`sensitivity`).
    """
    _check_positive_finite("bound", bound)
    stacked = _stack(updates)
    factors = _check_weights(weights, len(updates))
    flat = _flatten(stacked)  # (n, d)
    norms = np.sqrt(np.einsum("nd,nd->n", flat, flat))  # (n,)
    # bound / norm for updates above the bound, 1 otherwise (no division by a zero norm).
    scale = bound / np.where(norms > bound, norms, bound)  # (n,)
    factors = factors * scale / factors.sum()
    mean = {name: np.tensordot(factors, values, axes=1) for name, values in stacked.items()}
    return mean, [float(v) for v in norms]


def sensitivity(aggregator: str, clip: float, n_expected: float) -> float | None:
    """L2 sensitivity of an aggregator in fedrec's central-DP form, or None where it has no such bound.

    fedrec's central DP (:mod:`server.central_dp`) releases
    ``(sum_i clip_C(x_i) + N(0, z²C² I)) / n_expected``: every included silo's update
    clipped to L2 norm ``C = clip``, summed, divided by the *expected* number of
    silos ``n_expected = q·N``, fixed before the round. Neighbouring inputs differ by
    adding or removing one silo (client-level DP).

    Parameters
    ----------
    aggregator : str
        One of ``AGGREGATORS``: ``"mean"``, ``"weighted-mean"``,
        ``"norm-bounded-mean"``, ``"median"``, ``"trimmed-mean"``, ``"krum"``,
        ``"multi-krum"``.
    clip : float
        ``C > 0``, the L2 bound every input was clipped to.
    n_expected : float
        ``n̄ > 0``, the data-independent divisor (expected number of silos).

    Returns
    -------
    float | None
        ``clip / n_expected`` for ``"mean"`` and ``"norm-bounded-mean"`` in the
        equal-weight sum-then-divide form above. ``None`` for every other
        aggregator: no bound of the form ``clip / n_expected`` holds for it, and
        noise calibrated to ``clip / n_expected`` would not give the ε the accountant
        reports. The bounds that do hold are in the Notes.

    Raises
    ------
    ValueError
        If ``aggregator`` is not one of ``AGGREGATORS``, or ``clip`` or
        ``n_expected`` is boolean, non-finite or <= 0.

    Notes
    -----
    Gaussian mechanism over clipped client updates (DP-FedAvg): McMahan et al. 2018,
    "Learning Differentially Private Recurrent Language Models",
    https://arxiv.org/abs/1710.06963. Below, every input has ``|x_i| <= C`` and
    ``n`` is the realised number of inputs.

    *mean / norm-bounded-mean* (equal weights, divided by ``n̄``): adding or removing
    silo ``i`` changes the sum by exactly ``x_i``, and ``n̄`` does not depend on the
    data, so the release moves by ``|x_i| / n̄ <= C / n̄``. Norm bounding at any
    ``M`` keeps every norm ``<= C``, so the same holds. This is *not* the form of
    :func:`weighted_mean` / :func:`norm_bounded_mean` as written, which divide by
    the realised total weight.

    *weighted-mean* (data-size weights, realised total): the weights are data, and a
    silo with a large weight pulls the result to its own update; the change is only
    bounded by ``2C`` (both results are convex combinations of inputs of norm
    ``<= C``).

    *median*: no bound shrinks with ``n``. ``m`` copies of ``u`` and ``m`` of ``-u``
    (``|u| = C``) have median 0; adding one more ``u`` makes it ``u``, a change of
    ``C`` for every ``m``. ``C`` is also an upper bound whenever both sets are non-empty:
    (1) in a set of ``2m`` inputs whose middle values in coordinate ``j`` are
    ``a_j <= b_j``, ``m`` inputs have ``x_j <= a_j`` and ``m`` have ``x_j >= b_j``, so
    ``sum_i x_ij² >= m (max(-a_j, 0)² + max(b_j, 0)²) >= m (b_j - a_j)² / 2``;
    summing over ``j``, ``2m C² >= (m/2) sum_j (b_j - a_j)²``.
    (2) adding or removing one input moves the median of coordinate ``j`` by at most
    ``(b_j - a_j) / 2`` of whichever of the two sets has even size, so by (1) the
    median moves by at most ``C`` in L2. Calibrating noise to ``C`` would take ``n̄``
    times the mean's noise for the same ε.

    *trimmed-mean*: the divisor is the realised number of kept values
    ``n - 2⌊βn⌋``, and which values are kept depends on every silo, so there is no
    per-silo term to divide by ``n̄``. At ``n = 1 -> 2`` it moves from ``x_1`` to
    ``(x_1 + x_2) / 2``, up to ``C`` (``x_2 = -x_1``), whatever ``n̄`` is. A
    data-independent upper bound is ``2C / sqrt(1 - 2β)``: by Cauchy-Schwarz,
    ``|T|² <= sum_i |x_i|² / (n - 2⌊βn⌋) <= n C² / (n (1 - 2β))``, and the change is
    at most ``|T| + |T'|``. It needs ``β``, which this function does not take.

    *krum / multi-krum*: the result is the mean of selected inputs, so it has norm
    ``<= C`` and moves by at most ``2C``. One silo joining can flip the selection,
    for every even ``n = 2m >= 4``: with ``f = m - 2``, ``m`` copies of ``-u`` and the
    ``m`` points ``(1 - kε) u``, ``k < m`` (``|u| = C``), Krum selects ``-u``; one
    more ``u`` makes it select a point near ``u``, a change that tends to ``2C`` as
    ``ε -> 0``.
    """
    if aggregator not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {', '.join(AGGREGATORS)}; got {aggregator!r}")
    _check_positive_finite("clip", clip)
    _check_positive_finite("n_expected", n_expected)
    if aggregator in ("mean", "norm-bounded-mean"):
        return clip / n_expected
    return None


def _stack(updates: Sequence[Update]) -> dict[str, NDArray[np.float64]]:
    """Validate the updates and stack each parameter over silos: name -> (n, *shape) float64."""
    if len(updates) == 0:
        raise ValueError("updates is empty: pass at least one update (one per silo)")
    first = updates[0]
    if len(first) == 0:
        raise ValueError("updates[0] has no parameters: an update maps parameter names to arrays")
    names = list(first.keys())
    for i, update in enumerate(updates):
        if set(update.keys()) != set(names):
            missing = sorted(set(names) - set(update.keys()))
            extra = sorted(set(update.keys()) - set(names))
            raise ValueError(
                f"updates[{i}] has different parameter names than updates[0]: "
                f"missing {missing}, unexpected {extra}; every update must have the same names"
            )
    stacked: dict[str, NDArray[np.float64]] = {}
    for name in names:
        shape = np.shape(first[name])
        for i, update in enumerate(updates):
            value = np.asarray(update[name])
            if value.shape != shape:
                raise ValueError(
                    f"updates[{i}][{name!r}] has shape {value.shape}, updates[0][{name!r}] has "
                    f"{shape}; every update must have the same shapes"
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"updates[{i}][{name!r}] has dtype {value.dtype}; pass floating-point arrays")
            if not np.isfinite(value).all():
                raise ValueError(f"updates[{i}][{name!r}] holds NaN or inf; every value must be finite")
        # float32 -> float64 is exact; computing in float64 avoids float32 sums.
        stacked[name] = np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])
    return stacked


def _krum_scores(stacked: Mapping[str, NDArray[np.float64]], num_malicious: int) -> NDArray[np.float64]:
    """Krum scores of validated, stacked updates (see :func:`krum_scores`)."""
    flat = _flatten(stacked)  # (n, d)
    n = flat.shape[0]
    _check_krum_count(n, num_malicious)
    num_closest = n - num_malicious - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        diff = np.delete(flat, i, axis=0) - flat[i]  # (n - 1, d): self excluded
        sq_dist = np.einsum("jd,jd->j", diff, diff)  # (n - 1,)
        scores[i] = np.partition(sq_dist, num_closest - 1)[:num_closest].sum()
    return scores


def _flatten(stacked: Mapping[str, NDArray[np.float64]]) -> NDArray[np.float64]:
    """All parameters of every silo as one row: (n, d)."""
    rows = [values.reshape(values.shape[0], -1) for values in stacked.values()]
    return np.concatenate(rows, axis=1)


def _check_weights(weights: Sequence[float], n: int) -> NDArray[np.float64]:
    """Validate one finite weight >= 0 per update, not all zero; return them as (n,) float64."""
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} updates; pass one weight per update")
    for i, w in enumerate(weights):
        if not _is_real(w) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] is {w!r}; every weight must be a finite number >= 0")
    values = np.asarray([float(w) for w in weights], dtype=np.float64)
    if not values.sum() > 0:
        raise ValueError("weights are all zero; at least one update needs a positive weight")
    return values


def _check_fraction(name: str, value: float) -> None:
    """Reject booleans, non-finite values and values outside [0, 0.5)."""
    if not _is_real(value) or not 0.0 <= value < 0.5:
        raise ValueError(f"{name} must be a finite number in [0, 0.5); got {value!r}")


def _check_positive_finite(name: str, value: float) -> None:
    """Reject booleans, non-finite values and values <= 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def _check_int_in_range(name: str, value: int, low: int, high: int) -> None:
    """Reject booleans, non-integers and integers outside [low, high]."""
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def _check_krum_count(n: int, num_malicious: int) -> None:
    """Krum needs an integer f >= 0 and n >= 2f + 3 updates."""
    if not _is_int(num_malicious) or num_malicious < 0:
        raise ValueError(f"num_malicious must be an integer >= 0; got {num_malicious!r}")
    if n < 2 * num_malicious + 3:
        raise ValueError(
            f"Krum needs n >= 2 * num_malicious + 3 updates: got n={n} with num_malicious={num_malicious} "
            f"(needs n >= {2 * num_malicious + 3}); lower num_malicious or wait for more silos"
        )


def _is_real(value: object) -> bool:
    """Tell whether ``value`` is a real number and not a boolean (``True`` is an ``int``)."""
    return isinstance(value, Real) and not isinstance(value, bool | np.bool_)


def _is_int(value: object) -> bool:
    """Tell whether ``value`` is a Python or NumPy integer and not a boolean."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
