"""DiDE's findings checked on this run: each claim is one or more comparisons of two students' test means over their
seeds, with the Welch 95% interval of the difference, and a verdict read off the interval (:func:`stats.verdict`):
``holds`` above 0, ``does not hold`` below 0, ``inconclusive`` when it contains 0. A claim holds only if every one of
its comparisons holds. Ablation rows are found by their recipe (``recipes``, as the report stage passes them), not by
name; where several rows fit a role, the one with the best dev mean stands for it, so test is never used to choose.

1. DiDE > dual-GT on every understanding task (nlvr2, snli_ve, vqa); retrieval is a separate line (1b).
2. attention > hidden > soft > gt (knowledge table).
3. cross-modal > uni-modal attention, and cross-modal alone ≥ all attention (knowledge table).
4. last layer ≥ layer-wise (layers table).
5. two-stage > one-stage (stages table).

For the "≥" claims the same rule applies; ``inconclusive`` there means consistent with equal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from vldistill.report.stats import (FAILS, HOLDS, INCONCLUSIVE, Difference, combine, format_interval, verdict,
                                    welch)
from vldistill.report.tables import BASELINE, CLASSIFICATION_TASKS, MAIN, NOT_RUN, label, seed_scores

MISSING = "missing"


@dataclass(frozen=True)
class Comparison:
    """``better`` > ``worse`` (``at_least``: ≥) on one task's test ``metric``: the difference of their means over
    seeds (points) and its Welch interval, or, when either side has no score, what is missing."""

    name: str
    task: str
    metric: str
    difference: Difference | None = None
    missing: str | None = None
    at_least: bool = False

    @property
    def verdict(self) -> str:
        return MISSING if self.difference is None else verdict(self.difference.interval)


@dataclass(frozen=True)
class Finding:
    key: str
    claim: str
    rule: str
    comparisons: tuple[Comparison, ...]

    @property
    def verdict(self) -> str:
        """:func:`stats.combine` of the comparisons' verdicts (a missing one cannot hold); ``missing`` if all are."""
        verdicts = [c.verdict for c in self.comparisons]
        if verdicts and all(v == MISSING for v in verdicts):
            return MISSING
        return combine(verdicts)


def compare(metrics_dir: str | Path, task: str, metric: str, seeds: list[int], better: str | None,
            worse: str | None, name: str, at_least: bool = False, absent: str | None = None) -> Comparison:
    """Test means of ``better`` minus ``worse`` over ``seeds``; ``absent`` (or a missing file) makes it missing."""
    why = [absent] if absent else []
    sides = []
    for model in (better, worse):
        if model is not None:
            summary, gone = seed_scores(metrics_dir, task, model, seeds, "test", metric)
            sides.append(summary)
            why += [gone] if gone else []
    if why:
        return Comparison(name, task, metric, missing="; ".join(why), at_least=at_least)
    return Comparison(name, task, metric, welch(*sides), at_least=at_least)


def _terms(value) -> frozenset[str]:
    """A recipe field as a set: ``"soft+attn_cross"`` (as the report stage passes it) or a list."""
    return frozenset(value.split("+") if isinstance(value, str) else value)


def _attention(recipe: dict) -> frozenset[str]:
    return frozenset(t for t in _terms(recipe.get("knowledge", ())) if t.startswith("attn_"))


def choose(metrics_dir: str | Path, task: str, metric: str, seeds: list[int], variants: list[str],
           recipes: dict[str, dict], fits: Callable[[dict], bool], role: str,
           table: str) -> tuple[str | None, str | None]:
    """``(variant, None)``: the row of ``variants`` whose recipe ``fits`` the role (of several, the best dev mean over
    seeds), or ``(None, why)`` when no row fits or a candidate has no dev score to choose by."""
    candidates = [v for v in variants if fits(recipes.get(v, {}))]
    if not candidates:
        return None, f"no row of ablation.tables.{table} is {role}"
    if len(candidates) == 1:
        return candidates[0], None
    dev = {}
    for variant in candidates:
        summary, gone = seed_scores(metrics_dir, task, variant, seeds, "dev", metric)
        if gone:
            return None, f"{role}: cannot choose on dev, {gone}"
        dev[variant] = summary.mean
    return max(candidates, key=dev.get), None


def _role_name(role: str, variant: str | None, candidates: int) -> str:
    return f"{role} ({variant}{', best on dev' if candidates > 1 else ''})" if variant else role


def _ranked(metrics_dir, task, metric, seeds, table, variants, recipes, roles, strict) -> tuple[Comparison, ...]:
    """Consecutive comparisons of ``roles`` (``[(role, fits)]``, best first) among the rows of one ablation table:
    roles[0] vs roles[1], roles[1] vs roles[2], ...; ``strict[i]`` False makes comparison i a "≥"."""
    chosen = []
    for role, fits in roles:
        variant, why = choose(metrics_dir, task, metric, seeds, variants, recipes, fits, role, table)
        count = sum(fits(recipes.get(v, {})) for v in variants)
        chosen.append((_role_name(role, variant, count), variant, why))
    comparisons = []
    for (a, va, wa), (b, vb, wb), is_strict in zip(chosen, chosen[1:], strict):
        why = "; ".join(w for w in (wa, wb) if w) or None
        comparisons.append(compare(metrics_dir, task, metric, seeds, va, vb, f"{a} − {b}", not is_strict, why))
    return tuple(comparisons)


def _main_vs_baseline(metrics_dir, seeds, metrics, tasks, task_variants) -> tuple[Comparison, ...]:
    comparisons = []
    for task in tasks:
        absent = [v for v in (MAIN, BASELINE) if v not in task_variants.get(task, [])]
        why = f"{', '.join(absent)}: {NOT_RUN} on {task}" if absent else None
        comparisons.append(compare(metrics_dir, task, metrics[task], seeds, None if absent else MAIN,
                                   None if absent else BASELINE, f"{label(MAIN)} − {label(BASELINE)}, {task}",
                                   absent=why))
    return tuple(comparisons)


def dide_findings(metrics_dir: str | Path, seeds: list[int], metrics: dict[str, str], tasks: list[str],
                  task_variants: dict[str, list[str]], ablation_task: str, ablation_tables: dict[str, list[str]],
                  recipes: dict[str, dict]) -> list[Finding]:
    """DiDE's five findings (and retrieval as line 1b) on this run's test scores, ``metrics[task]`` being the
    metric of each task (the one checkpoints are chosen by on dev; retrieval: mean recall)."""
    understanding = [t for t in CLASSIFICATION_TASKS if t in tasks]
    findings = [Finding("1", f"{label(MAIN)} > {label(BASELINE)} on every understanding task "
                             f"({', '.join(understanding)})",
                        "test mean over seeds of each task's metric; the claim holds only if it holds on every task",
                        _main_vs_baseline(metrics_dir, seeds, metrics, understanding, task_variants))]
    if "retrieval" in tasks:
        findings.append(Finding("1b", f"{label(MAIN)} > {label(BASELINE)} on retrieval ({metrics['retrieval']})",
                                "retrieval, shown apart from the understanding tasks",
                                _main_vs_baseline(metrics_dir, seeds, metrics, ["retrieval"], task_variants)))
    task, metric = ablation_task, metrics[ablation_task]
    knowledge = list(ablation_tables.get("knowledge", []))

    def only(*terms):
        return lambda recipe: _terms(recipe.get("knowledge", ())) == frozenset(terms)

    def attention_alone(term):
        return lambda recipe: _attention(recipe) == {term}

    levels = [("attention", lambda r: bool(_attention(r))),
              ("hidden", lambda r: "hidden" in _terms(r.get("knowledge", ())) and not _attention(r)),
              ("soft", only("soft")), ("gt", only("gt"))]
    findings.append(Finding(
        "2", "attention > hidden > soft > gt",
        f"{task}, rows of ablation.tables.knowledge by recipe: gt = knowledge gt alone, soft = soft alone, hidden = "
        "with hidden and no attention term, attention = with an attn_* term; of several rows in a role, the best "
        "dev mean stands for it (chosen on dev, never on test)",
        _ranked(metrics_dir, task, metric, seeds, "knowledge", knowledge, recipes, levels, [True, True, True])))
    cross = ("cross-modal attention", attention_alone("attn_cross"))
    findings.append(Finding(
        "3", "cross-modal > uni-modal attention, and cross-modal alone ≥ all attention",
        f"{task}, rows of ablation.tables.knowledge whose only attention term is attn_cross, attn_uni, attn_all; "
        "≥: inconclusive means consistent with equal",
        _ranked(metrics_dir, task, metric, seeds, "knowledge", knowledge, recipes,
                [cross, ("uni-modal attention", attention_alone("attn_uni"))], [True])
        + _ranked(metrics_dir, task, metric, seeds, "knowledge", knowledge, recipes,
                  [cross, ("all attention", attention_alone("attn_all"))], [False])))
    findings.append(Finding(
        "4", "last layer ≥ layer-wise",
        f"{task}, rows of ablation.tables.layers by recipe layers; ≥: inconclusive means consistent with equal",
        _ranked(metrics_dir, task, metric, seeds, "layers", list(ablation_tables.get("layers", [])), recipes,
                [("last layer", lambda r: r.get("layers") == "last"),
                 ("layer-wise", lambda r: r.get("layers") == "layerwise")], [False])))
    findings.append(Finding(
        "5", "two-stage > one-stage distillation",
        f"{task}, rows of ablation.tables.stages by recipe stages: pretrain+finetune vs finetune alone",
        _ranked(metrics_dir, task, metric, seeds, "stages", list(ablation_tables.get("stages", [])), recipes,
                [("two-stage", lambda r: _terms(r.get("stages", ())) == {"pretrain", "finetune"}),
                 ("one-stage", lambda r: _terms(r.get("stages", ())) == {"finetune"})], [True])))
    return findings


def _shown_verdict(comparison: Comparison) -> str:
    if comparison.at_least and comparison.verdict == INCONCLUSIVE:
        return f"{INCONCLUSIVE} (consistent with equal)"
    return comparison.verdict


def findings_table(findings: list[Finding], decimals: int = 1) -> pd.DataFrame:
    """One row per comparison: its finding, what is compared, the test difference of means (points), its Welch 95%
    interval, the seeds per side and the verdict (or what is missing)."""
    rows = []
    for finding in findings:
        for c in finding.comparisons:
            row = {"finding": finding.key, "comparison": c.name + (" (≥)" if c.at_least else ""),
                   "task, metric": f"{c.task}, test {c.metric}"}
            if c.difference is None:
                row |= {"difference (points)": c.missing, "95% interval (Welch)": "", "seeds per side": "",
                        "verdict": MISSING}
            else:
                d = c.difference
                row |= {"difference (points)": f"{d.value:+.{decimals}f}",
                        "95% interval (Welch)": format_interval(d.interval, decimals, signed=True),
                        "seeds per side": f"{d.a.n} / {d.b.n}", "verdict": _shown_verdict(c)}
            rows.append(row)
    return pd.DataFrame(rows)


def finding_line(finding: Finding) -> str:
    """``**<key>. <claim>: <verdict>.** (<k> of <n> comparisons hold; <rule>)``."""
    held = sum(c.verdict == HOLDS for c in finding.comparisons)
    failed = sum(c.verdict == FAILS for c in finding.comparisons)
    counts = f"{held} of {len(finding.comparisons)} comparisons hold" + (f", {failed} do not" if failed else "")
    return f"**{finding.key}. {finding.claim}: {finding.verdict}.** ({counts}; {finding.rule})"
