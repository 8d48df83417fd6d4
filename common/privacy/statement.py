"""One honest sentence per privacy owner (a silo or the server), from its ledger alone.

``report.md`` and ``audit.md`` open with these sentences. Each says, for one owner,
the unit of privacy, the ε it has spent at its δ (and whether that δ is weak), the
accountant, the neighbouring relation, the public roster size N, what each kind of
mechanism released and how often, and the rounds it declined. The sentences are
built from :class:`~common.privacy.events.PrivacyRelease` objects only (a ledger's
releases, or the releases in ``metrics.jsonl``), so they say what the ledger
supports and nothing more. That nothing *else* a silo sent is derived from its
users' data is fedrec's release policy under local and central DP
(``docs/privacy.md``, "Release policy"); the sentence states it, and the policy's
tests check it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from common.privacy.events import (
    BUDGET_DECLINE,
    DP_EVALUATION,
    DP_FEDAVG,
    DP_SGD,
    RELATION,
    SERVER_OWNER,
    PrivacyRelease,
    partition_of,
    silo_owner,
)
from common.privacy.ledger import LedgerError, read_ledger, releases
from common.rundir import RunDir

# How many of each mechanism kind, in words: (singular, plural).
_KIND_WORDS: Mapping[str, tuple[str, str]] = {
    DP_SGD: ("round of DP-SGD", "rounds of DP-SGD"),
    DP_FEDAVG: ("round of DP-FedAvg", "rounds of DP-FedAvg"),
    DP_EVALUATION: ("noisy evaluation", "noisy evaluations"),
}
# What the roster of N units is, per unit.
_ROSTER: Mapping[str, tuple[str, str]] = {
    "user": ("user", "users"),
    "interaction": ("interaction slot", "interaction slots"),
    "client": ("silo", "silos"),
}


def owner_name(owner: str) -> str:
    """``silo-2`` -> ``silo 2``; the server stays ``server``."""
    pid = partition_of(owner)
    return owner if pid is None else f"silo {pid}"


def format_epsilon(value: float) -> str:
    """ε to three significant digits (∞ for an unbounded one)."""
    if math.isinf(value):
        return "∞"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:#.3g}" if value < 1 else (f"{value:.2f}" if value < 10 else f"{value:.1f}")


def format_delta(value: float) -> str:
    """δ to two significant digits, with a short exponent (``5.3e-4``)."""
    text = f"{value:.2g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def ranges(rounds: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``1–3, 5``."""
    values = sorted(set(rounds))
    if not values:
        return "-"
    parts: list[str] = []
    start = prev = values[0]
    for r in [*values[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if r is not None:
            start = prev = r
    return ", ".join(parts)


def _rounds_word(rounds: Sequence[int]) -> str:
    return f"round {ranges(rounds)}" if len(set(rounds)) == 1 else f"rounds {ranges(rounds)}"


def _count(kind: str, n: int) -> str:
    singular, plural = _KIND_WORDS.get(kind, (f"{kind} release", f"{kind} releases"))
    return f"{n} {singular if n == 1 else plural}"


def _roster(unit: str, population: int) -> str:
    singular, plural = _ROSTER.get(unit, (f"{unit} unit", f"{unit} units"))
    noun = singular if population == 1 else plural
    return f"its roster of {population:,} {noun}" if unit == "client" else f"its {population:,} {noun}"


def _claim(last: PrivacyRelease, epsilon: float) -> str:
    """``user-level (ε = 7.91, δ = 1e-5) under PLD accounting for the zero-out relation over its 189 users``."""
    delta = f"δ = {format_delta(last.delta)}"
    tenth = 1.0 / (10 * last.population)
    if last.delta > tenth:
        delta += f", weak: above 1/(10N) = {format_delta(tenth)}"
    return (
        f"{last.unit}-level (ε = {format_epsilon(epsilon)}, {delta}) under {last.accountant.upper()} "
        f"accounting for the {RELATION} relation over {_roster(last.unit, last.population)}"
    )


def _coverage(used: Sequence[PrivacyRelease]) -> str:
    """``10 rounds of DP-SGD that released …, and 3 noisy evaluations that released …``."""
    by_kind: dict[str, list[PrivacyRelease]] = {}
    for r in used:
        by_kind.setdefault(r.kind, []).append(r)
    parts = []
    for kind, group in by_kind.items():
        n = len({r.server_round for r in group})
        parts.append(f"{_count(kind, n)} that released {group[-1].released}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]


def _declines(declined: Sequence[PrivacyRelease]) -> str:
    first = declined[0]
    if first.epsilon_if_trained is not None and first.target_epsilon:
        why = (
            f"one more round would have reached ε = {format_epsilon(first.epsilon_if_trained)} "
            f"> its budget {first.target_epsilon:g}"
        )
    else:
        why = "its budget would have been exceeded"
    return f"{_rounds_word([r.server_round for r in declined])} ({why})"


def silo_sentence(releases: Sequence[PrivacyRelease], *, owner: str | None = None) -> str:
    """The statement of one silo, from its releases (ledger order).

    ``owner`` names the silo when it has no release (e.g. ``"silo-3"``).

    Raises
    ------
    ValueError
        If the releases belong to more than one owner, or none is given and the
        owner cannot be named.
    """
    return _sentence(releases, owner, "it sent", "its users' data")


def server_sentence(releases: Sequence[PrivacyRelease], *, silos_noised: bool = False) -> str:
    """The statement of the server's central DP (unit: client), from its releases.

    ``silos_noised``: the silos ran local DP too (``local+central``), so the updates
    the server saw were already DP-SGD outputs; otherwise the server is trusted with
    each silo's un-noised update, and the sentence says so.
    """
    text = _sentence(releases, SERVER_OWNER, "it released", "the silos' updates")
    if not any(r.trained for r in releases):
        return text
    trust = (
        "the updates it received were already the silos' DP-SGD outputs"
        if silos_noised
        else "the server itself sees each silo's update before noise and is trusted with it"
    )
    return text[:-1] + f" ({trust})."


def _sentence(rels: Sequence[PrivacyRelease], owner: str | None, sent: str, data: str) -> str:
    owners = {r.owner for r in rels}
    if len(owners) > 1:
        raise ValueError(f"releases of several owners: {', '.join(sorted(owners))}")
    name_of = next(iter(owners), owner)
    if name_of is None:
        raise ValueError("no release and no owner: cannot name whose statement this is")
    name = owner_name(name_of)
    if not rels:
        return f"{name}: its ledger holds no privacy release, so no differential-privacy guarantee covers what {sent}."
    used = [r for r in rels if r.trained]
    declined = [r for r in rels if r.kind == BUDGET_DECLINE]
    last = rels[-1]
    epsilon = max(r.epsilon for r in rels)
    if not used:
        return (
            f"{name}: declined {_declines(declined)} under a {last.unit}-level budget "
            f"(δ = {format_delta(last.delta)}, {last.accountant.upper()}, {RELATION} relation over "
            f"{_roster(last.unit, last.population)}), so nothing {sent} derived from {data}."
        )
    text = f"{name}: {_claim(last, epsilon)}, covering {_coverage(used)}"
    if declined:
        text += f"; it declined {_declines(declined)}"
    return text + f"; nothing else {sent} derived from {data}."


def no_dp_sentence() -> str:
    """The statement of a run without differential privacy."""
    return (
        "No differential privacy (`privacy.mode = none`): the silos' model updates, training "
        "statistics and evaluation sums are computed on their users' data and sent without "
        "noise; no ε applies to anything this run released."
    )


def statements(
    by_owner: Mapping[str, Sequence[PrivacyRelease]],
    mode: str,
    *,
    problems: Mapping[str, str] | None = None,
) -> list[str]:
    """One sentence per owner: silos by partition id, then the server.

    ``mode`` is ``privacy.mode``. Under ``none`` (and no release) the run gets one
    sentence. ``problems`` maps an owner whose ledger could not be read to the
    reason; its sentence says so instead.
    """
    problems = dict(problems or {})
    owners = set(by_owner) | set(problems)
    if mode == "none" and not any(by_owner.values()):
        return [no_dp_sentence()]
    silos = sorted((o for o in owners if partition_of(o) is not None), key=lambda o: partition_of(o) or 0)
    out = []
    for owner in silos:
        if owner in problems:
            out.append(_unverified(owner, problems[owner]))
        elif by_owner.get(owner) or "local" in mode:
            out.append(silo_sentence(by_owner.get(owner, ()), owner=owner))
    if SERVER_OWNER in problems:
        out.append(_unverified(SERVER_OWNER, problems[SERVER_OWNER]))
    elif by_owner.get(SERVER_OWNER) or "central" in mode:
        out.append(server_sentence(by_owner.get(SERVER_OWNER, ()), silos_noised="local" in mode))
    return out


def _unverified(owner: str, reason: str) -> str:
    return f"{owner_name(owner)}: its ledger does not verify ({reason}), so no statement is made from it."


def run_releases(run: RunDir) -> tuple[dict[str, list[PrivacyRelease]], dict[str, str]]:
    """Every ledger's releases in a run directory, and the owners whose ledger failed.

    Returns
    -------
    (releases, problems)
        ``releases`` maps each owner with a readable ledger (``silo-<k>``,
        ``server``) to its releases in ledger order; ``problems`` maps each owner
        whose ledger does not verify to the reason (the audit names the line).
    """
    paths = [(SERVER_OWNER, run.server_ledger)] if run.server_ledger.exists() else []
    paths += [(silo_owner(pid), path) for pid, path in run.silo_ledgers()]
    found: dict[str, list[PrivacyRelease]] = {}
    problems: dict[str, str] = {}
    for owner, path in paths:
        try:
            found[owner] = releases(read_ledger(path, owner))
        except LedgerError as exc:
            problems[owner] = exc.reason if exc.line is None else f"line {exc.line}: {exc.reason}"
    return found, problems
