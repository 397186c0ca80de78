"""`gemma-ewc report`: compare eval results of several runs (the base model and each λ) at a glance.

The Markdown report has two tables, runs × tasks: the scores (each task's primary metric, in percent, ± its
standard error; perplexity and bits per byte of each text set), and the change relative to the base run
(percentage points per task, their mean, and the relative change of perplexity): forgetting is negative, gain
positive. Rows: the base first, then runs by increasing λ (and replay weight). A "Pareto frontier" section lists the
runs no other run beats on both the old-knowledge and the new-language metric. A "Comparability" section lists what
differs between runs that should not (task files, few-shot counts, context length), so a table never silently mixes
setups.

The base is `--base` (a label or a results file), or else the one run recorded without λ (the pretrained model).

Old and new: `--old NAME` / `--new NAME` name the old-knowledge and the new-language metric, each a perplexity set
(its perplexity; lower is better) or a task (its primary score in percent; higher is better). Without them, results
with exactly two perplexity sets take the first (in the first results file's order) as old and the second as new;
otherwise there is no Pareto plot or frontier until both are given.

Replay weight: a run whose results carry run.data_weights (copied by eval from the exported model's gemma-ewc.json:
the data stores' weights, normalised to sum 1) trained on the first store, the new language, mixed with replay of the
others; its replay weight is the weight of every store but the first, 1 - data_weights[0]. Runs without the field
(or with null) have none. Runs that share λ but differ in replay are separate points and lines.

With `--plots DIR` (needs matplotlib), all drawn 7 inches wide at 130 dpi so that they stay readable scaled to a
README's ~700 px:
- pareto.png: the old metric (y) against the new one (x), one point per run labelled "λ=100, replay 5%", the base a
  black star, the frontier a line through the non-dominated runs. Better is up and right: a perplexity axis is
  inverted (its label says so), so the best trade-offs sit in the top right corner.
- accuracy_vs_lambda.png (one panel per task) and perplexity_vs_lambda.png (one panel per text set): each metric
  against λ on a log axis; λ = 0 sits one decade left of the smallest positive λ, its tick reads "0" and a "//"
  break on the axis marks that it is not a point of the log scale. One line per replay weight; the base is a dashed
  line, like the reference study's figures.
- drift_per_block.png: where along the model the parameters moved from the anchor, for each run whose training
  metrics can be found (results' run.checkpoint is RUN_DIR/checkpoints/step_N, so RUN_DIR/metrics.jsonl) and hold
  the `drift` telemetry (EWC on): one row per run, two heat maps, blocks (embedding at the bottom, the final norm
  at the top) × logging steps, coloured by the F-weighted drift sum F (θ - θ*)² and the plain drift ‖θ - θ*‖² on
  one log scale per column for all runs. Runs without such metrics are left out, and the Markdown names them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from trainer.errors import UserError
from trainer.fileio import atomic_path

RESULTS_FORMAT = "gemma-ewc/eval-v1"
PLOT_FILES = ("accuracy_vs_lambda.png", "perplexity_vs_lambda.png", "pareto.png",
              "drift_per_block.png")  # what --plots DIR receives
FIGURE_WIDTH_INCHES = 7.0
PLOT_DPI = 130  # 7 in × 130 = 910 px: a README's ~700 px scales it by 0.77, so 10 pt text stays ~14 px tall
PLOT_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
              "ytick.labelsize": 10, "legend.fontsize": 9, "lines.markersize": 7, "lines.linewidth": 1.8}


@dataclass
class Run:
    path: Path
    label: str
    ewc_lambda: float | None
    data: dict

    @property
    def replay_weight(self) -> float | None:
        """The weight of every data store but the first (the new language), or None for a single-store run."""
        weights = self.data.get("run", {}).get("data_weights")
        return None if weights is None else 1.0 - float(weights[0])


@dataclass(frozen=True)
class Metric:
    """One axis of the Pareto plot: a perplexity set's perplexity, or a task's primary score in percent."""
    name: str
    unit: str  # "perplexity", or the task's primary metric ("acc")
    lower_is_better: bool

    def value(self, run: Run) -> float | None:
        if self.lower_is_better:
            number = ppl_value(run, self.name, "perplexity")
        else:
            score = task_score(run, self.name, self.unit)
            number = None if score is None else 100 * score[0]
        return None if number is None or math.isnan(number) else number

    def describe(self) -> str:
        return f"{self.name} ({self.unit})" if self.lower_is_better else f"{self.name} ({self.unit} %)"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(path: Path, data: dict) -> None:
    """The fields the report reads have the types eval writes (trainer/evaluate/runner.py); else a UserError that
    names the file and the field (a hand-edited or truncated-and-repaired results file)."""
    def bad(field: str, value, expected: str) -> UserError:
        return UserError(f"{path}: field {field} is {json.dumps(value)[:60]}, expected {expected}; make the file "
                         f"again with gemma-ewc eval --out")

    lam = data.get("lambda")
    if not (lam is None or (_is_number(lam) and lam >= 0)):
        raise bad("lambda", lam, "a number >= 0 or null")
    if not isinstance(data.get("label") or "", str):
        raise bad("label", data["label"], "a string")
    for field in ("model", "settings", "perplexity", "tasks", "run"):
        if not isinstance(data.get(field, {}), dict):
            raise bad(field, data[field], "an object")
    weights = data.get("run", {}).get("data_weights")
    if weights is not None and not (isinstance(weights, list) and weights and all(
            _is_number(w) and 0 <= w <= 1 for w in weights)):
        raise bad("run.data_weights", weights, "null or a list of weights between 0 and 1, one per data store")
    for name, entry in data.get("perplexity", {}).items():
        if not isinstance(entry, dict):
            raise bad(f"perplexity.{name}", entry, "an object")
        for key in ("perplexity", "bits_per_byte"):
            if entry.get(key) is not None and not _is_number(entry[key]):
                raise bad(f"perplexity.{name}.{key}", entry[key], "a number")
    for name, task in data.get("tasks", {}).items():
        if not isinstance(task, dict):
            raise bad(f"tasks.{name}", task, "an object")
        for key in ("scores", "stderr"):
            metrics = task.get(key, {})
            if not isinstance(metrics, dict):
                raise bad(f"tasks.{name}.{key}", metrics, "an object of metric: number")
            for metric, number in metrics.items():
                if number is not None and not _is_number(number):
                    raise bad(f"tasks.{name}.{key}.{metric}", number, "a number")
        if not isinstance(task.get("primary"), str) or task["primary"] not in task.get("scores", {}):
            raise bad(f"tasks.{name}.primary", task.get("primary"), "the name of one of its scores")


def load_runs(paths: Sequence[Path]) -> list[Run]:
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"results file {path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not a results JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            raise UserError(f"{path} is not a gemma-ewc eval results file (format {RESULTS_FORMAT!r}); "
                            f"make it with gemma-ewc eval --out")
        _check_fields(Path(path), data)
        lam = data.get("lambda")
        runs.append(Run(Path(path), str(data.get("label") or Path(path).stem), None if lam is None else float(lam),
                        data))
    labels = [r.label for r in runs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise UserError(f"two results are labelled {dupes[0]!r}: give each run its own --label when evaluating")
    return runs


def choose_base(runs: Sequence[Run], base: str | None) -> Run | None:
    if base is not None:
        for r in runs:
            if r.label == base or (Path(base).exists() and r.path.resolve() == Path(base).resolve()):
                return r
        raise UserError(f"--base {base!r} is neither the label nor the file of any of the given results "
                        f"(labels: {', '.join(r.label for r in runs)})")
    unlabelled = [r for r in runs if r.ewc_lambda is None]
    if len(unlabelled) == 1:
        return unlabelled[0]
    if len(unlabelled) > 1:
        raise UserError(f"runs {', '.join(r.label for r in unlabelled)} all lack a lambda: say which is the "
                        f"base model with --base LABEL")
    return None


def order_runs(runs: Sequence[Run], base: Run | None) -> list[Run]:
    rest = [r for r in runs if r is not base]
    rest.sort(key=lambda r: (r.ewc_lambda is None, r.ewc_lambda if r.ewc_lambda is not None else 0.0,
                             r.replay_weight is not None, r.replay_weight or 0.0, r.label))
    return ([base] if base else []) + rest


def _union(runs: Sequence[Run], key: str) -> list[str]:
    names: list[str] = []
    for r in runs:
        for name in r.data.get(key, {}):
            if name not in names:
                names.append(name)
    return names


def _primary(runs: Sequence[Run], task: str) -> str:
    for r in runs:
        if task in r.data.get("tasks", {}):
            return r.data["tasks"][task]["primary"]
    raise KeyError(task)


def task_score(run: Run, task: str, metric: str) -> tuple[float, float | None] | None:
    t = run.data.get("tasks", {}).get(task)
    if not t or t.get("scores", {}).get(metric) is None:
        return None
    return t["scores"][metric], t.get("stderr", {}).get(metric)


def ppl_value(run: Run, name: str, key: str) -> float | None:
    p = run.data.get("perplexity", {}).get(name)
    return None if not p else p.get(key)


def _metric_named(runs: Sequence[Run], name: str, flag: str) -> Metric:
    """A perplexity set wins over a task of the same name (eval keeps the two name spaces apart)."""
    ppl_sets, tasks = _union(runs, "perplexity"), _union(runs, "tasks")
    if name in ppl_sets:
        return Metric(name, "perplexity", lower_is_better=True)
    if name in tasks:
        return Metric(name, _primary(runs, name), lower_is_better=False)
    raise UserError(f"{flag} {name!r} is neither a perplexity set nor a task of the given results (perplexity "
                    f"sets: {', '.join(ppl_sets) or 'none'}; tasks: {', '.join(tasks) or 'none'})")


def choose_old_new(runs: Sequence[Run], *, old: str | None, new: str | None) -> tuple[Metric, Metric] | None:
    """The old-knowledge and new-language metrics, or None when they are neither given nor implied.

    `runs` in the order the results files were given: with no --old/--new and exactly two perplexity sets, the
    first set (the first file's order) is old and the second new. With only one of the two options and two
    perplexity sets, the other option is the other set.
    """
    ppl_sets = _union(runs, "perplexity")
    if old is None and new is None:
        if len(ppl_sets) != 2:
            return None
        old, new = ppl_sets
    elif old is None or new is None:
        given, flag, missing = (old, "--old", "--new") if new is None else (new, "--new", "--old")
        _metric_named(runs, given, flag)
        others = [name for name in ppl_sets if name != given]
        if len(ppl_sets) != 2 or len(others) != 1:
            raise UserError(f"{flag} {given} needs {missing} too (the other option is implied only when the "
                            f"results have exactly two perplexity sets; they have: {', '.join(ppl_sets) or 'none'})")
        old, new = (given, others[0]) if new is None else (others[0], given)
    if old == new:
        raise UserError(f"--old and --new are both {old!r}: name two different perplexity sets or tasks")
    return _metric_named(runs, old, "--old"), _metric_named(runs, new, "--new")


def pareto_frontier(points: Sequence[tuple[float, float]], *, lower_is_better: tuple[bool, bool]) -> list[int]:
    """Indices (in input order) of the points no other point dominates.

    A point dominates another when it is at least as good on both coordinates and better on one; "good" per
    coordinate is lower or higher as `lower_is_better` says. Equal points do not dominate each other, so ties stay
    on the frontier together.
    """
    signs = [-1.0 if lower else 1.0 for lower in lower_is_better]  # each coordinate as "higher is better"
    scored = [(signs[0] * x, signs[1] * y) for x, y in points]

    def dominates(a, b) -> bool:
        return a[0] >= b[0] and a[1] >= b[1] and a != b

    return [i for i, p in enumerate(scored) if not any(dominates(q, p) for q in scored)]


def pareto_candidates(runs: Sequence[Run], base: Run | None, old: Metric, new: Metric) -> list[Run]:
    """The runs with both metrics, base excluded: it is the starting point the trade-off is measured from, not a
    choice of λ (and with the best old score and no training on the new language it would always be on the
    frontier)."""
    return [r for r in runs if r is not base and old.value(r) is not None and new.value(r) is not None]


def frontier_runs(runs: Sequence[Run], base: Run | None, old: Metric, new: Metric) -> list[Run]:
    candidates = pareto_candidates(runs, base, old, new)
    keep = pareto_frontier([(old.value(r), new.value(r)) for r in candidates],
                           lower_is_better=(old.lower_is_better, new.lower_is_better))
    return [candidates[i] for i in keep]


def _lambda_text(lam: float | None) -> str:
    if lam is None:
        return "–"
    return f"{lam:g}"


def _replay_text(weight: float | None) -> str:
    return "–" if weight is None else f"{100 * weight:.3g}%"


def _point_label(run: Run) -> str:
    """"λ=1e6, replay 5%" ("λ=10 decoupled" for ewc.mode decoupled): three digits and compact exponents (10000 ->
    "1e4") so the labels stay short."""
    if run.ewc_lambda is None:
        text = run.label
    else:
        mantissa, _, exponent = f"{run.ewc_lambda:.3g}".partition("e")
        text = "λ=" + mantissa + (f"e{int(exponent)}" if exponent else "")
    if run.data.get("run", {}).get("ewc_mode") == "decoupled":
        text += " decoupled"
    return text if run.replay_weight is None else f"{text}, replay {_replay_text(run.replay_weight)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _signed(x: float, digits: int = 1) -> str:
    return ("+" if x > 0 else "−" if x < 0 else "±") + f"{abs(x):.{digits}f}"


def comparability(runs: Sequence[Run], tasks: Sequence[str], ppl_sets: Sequence[str]) -> list[str]:
    """What differs between runs on the same task or text set (files, few-shot, context length)."""
    notes = []
    for task in tasks:
        present = [r for r in runs if task in r.data.get("tasks", {})]
        for key, what in (("sha256", "task files"), ("num_fewshot", "few-shot counts"), ("n", "item counts"),
                          ("fewshot_sha256", "few-shot files")):
            values = {r.label: r.data["tasks"][task].get(key) for r in present}
            if len(set(map(str, values.values()))) > 1:
                shown = ", ".join(f"{k}: {str(v)[:12]}" for k, v in values.items())
                notes.append(f"{task}: runs differ in {what} ({shown})")
        missing = [r.label for r in runs if r not in present]
        if missing:
            notes.append(f"{task}: no result for {', '.join(missing)}")
    for name in ppl_sets:
        present = [r for r in runs if name in r.data.get("perplexity", {})]
        shas = {r.data["perplexity"][name].get("sha256") for r in present}
        if len(shas) > 1:
            notes.append(f"perplexity set {name}: runs used different files")
        toks = {r.data["model"].get("tokenizer_sha256") for r in present}
        if len(toks) > 1:
            notes.append(f"perplexity set {name}: runs used different tokenizers; compare bits per byte, "
                         f"not perplexity")
    by_weights: dict[str, list[str]] = {}
    for r in runs:
        by_weights.setdefault(str(r.data.get("model", {}).get("fingerprint")), []).append(r.label)
    for labels in by_weights.values():
        if len(labels) > 1:
            notes.append(f"runs {', '.join(labels)} evaluated the same weights (same model fingerprint)")
    # The context itself (max_length) is what must agree; where it came from (context_source) may differ: a sweep
    # scores its base model with --max-length at the runs' trained length.
    for key in ("max_length", "stride", "limit"):
        values = {r.label: r.data.get("settings", {}).get(key) for r in runs}
        if len(set(map(str, values.values()))) > 1:
            notes.append(f"settings differ in {key}: " + ", ".join(f"{k}: {v}" for k, v in values.items()))
    return notes


def _old_new_line(old: Metric, new: Metric) -> str:
    def better(m: Metric) -> str:
        return "lower is better" if m.lower_is_better else "higher is better"

    return f"Old knowledge: {old.describe()}, {better(old)}; new language: {new.describe()}, {better(new)}."


def render_markdown(runs: Sequence[Run], base: Run | None, *, plots: Sequence[Path] = (),
                    out_dir: Path | None = None, old_new: tuple[Metric, Metric] | None = None,
                    without_drift: Sequence[Run] = ()) -> str:
    tasks = _union(runs, "tasks")
    ppl_sets = _union(runs, "perplexity")
    metrics = {t: _primary(runs, t) for t in tasks}
    # The replay column appears only in a replay study, so that single-store reports read as before.
    with_replay = any(r.replay_weight is not None for r in runs)

    def run_cells(r: Run, name: str) -> list[str]:
        return [name, _lambda_text(r.ewc_lambda)] + ([_replay_text(r.replay_weight)] if with_replay else [])

    run_header = ["run", "λ"] + (["replay"] if with_replay else [])
    lines = ["# Evaluation report", ""]
    base_text = base.label if base else "none (give --base, or evaluate the pretrained model without --lambda)"
    lines.append(f"{len(runs)} run(s); base: {base_text}.")
    lines.append("Scores in percent (± standard error); perplexity (ppl) per token of the model's tokenizer, "
                 "bits per byte (bpb) independent of it.")
    lines.append("")
    header = run_header + [f"{t} ({metrics[t]})" for t in tasks]
    header += [h for name in ppl_sets for h in (f"{name} ppl", f"{name} bpb")]
    rows = []
    for r in runs:
        row = run_cells(r, r.label + (" (base)" if r is base else ""))
        for t in tasks:
            s = task_score(r, t, metrics[t])
            if s is None:
                row.append("–")
            else:
                se = f" ± {100 * s[1]:.1f}" if s[1] is not None and not math.isnan(s[1]) else ""
                row.append(f"{100 * s[0]:.1f}{se}")
        for name in ppl_sets:
            p, b = ppl_value(r, name, "perplexity"), ppl_value(r, name, "bits_per_byte")
            row += ["–" if p is None else f"{p:.4g}", "–" if b is None else f"{b:.4f}"]
        rows.append(row)
    lines += ["## Scores", "", _table(header, rows), ""]

    if base is not None and len(runs) > 1:
        header = run_header + [f"Δ {t}" for t in tasks] + ["mean Δ"] + [f"Δ {n} ppl" for n in ppl_sets]
        rows = []
        for r in runs[1:]:
            row = run_cells(r, r.label)
            deltas = []
            for t in tasks:
                a, b = task_score(r, t, metrics[t]), task_score(base, t, metrics[t])
                if a is None or b is None:
                    row.append("–")
                else:
                    deltas.append(100 * (a[0] - b[0]))
                    row.append(_signed(deltas[-1]))
            row.append(_signed(sum(deltas) / len(deltas)) if deltas else "–")
            for name in ppl_sets:
                a, b = ppl_value(r, name, "perplexity"), ppl_value(base, name, "perplexity")
                row.append("–" if a is None or b is None else _signed(100 * (a / b - 1)) + "%")
            rows.append(row)
        lines += ["## Change vs base", "",
                  "Percentage points (negative: forgetting, positive: gain); perplexity: relative change.", "",
                  _table(header, rows), ""]

    lines += ["## Pareto frontier", ""]
    if old_new is None:
        lines += [f"Give --old NAME and --new NAME (a perplexity set or a task) to see which runs trade old "
                  f"knowledge for the new language best (perplexity sets: {', '.join(ppl_sets) or 'none'}; "
                  f"tasks: {', '.join(tasks) or 'none'}).", ""]
    else:
        old, new = old_new
        frontier = frontier_runs(runs, base, old, new)
        lines += [_old_new_line(old, new) + " The runs no other run beats on both (the base is not a candidate):",
                  ""]
        if frontier:
            lines += [_table(run_header + [f"old: {old.describe()}", f"new: {new.describe()}"],
                             [run_cells(r, r.label) + [f"{old.value(r):.4g}", f"{new.value(r):.4g}"]
                              for r in frontier]), ""]
        else:
            lines += ["No run other than the base has both metrics.", ""]

    notes = comparability(runs, tasks, ppl_sets)
    lines += ["## Comparability", ""]
    lines += [f"- {n}" for n in notes] if notes else ["Every run used the same task files, few-shot counts and "
                                                      "settings."]
    lines.append("")
    lines += ["## Runs", "", _table(run_header + ["results", "model", "fingerprint"],
                                    [run_cells(r, r.label) + [str(r.path), r.data["model"].get("path", ""),
                                                              str(r.data["model"].get("fingerprint", ""))[:16]]
                                     for r in runs]), ""]
    if plots:
        lines += ["## Plots", ""]
        if old_new is not None and any(p.name == PLOT_FILES[2] for p in plots):
            lines += [f"Pareto plot: {_old_new_line(*old_new)} Better is up and right.", ""]
        if any(p.name == PLOT_FILES[3] for p in plots):
            lines += ["Drift per block: per logging step, the F-weighted drift Σ F(θ − θ*)² and the plain drift "
                      "‖θ − θ*‖² of the embedding, each decoder block and the final norm (log colour scale).", ""]
        if without_drift:
            lines += [f"No drift telemetry (training metrics.jsonl not found, or trained without EWC): "
                      f"{', '.join(r.label for r in without_drift)}.", ""]
        for p in plots:
            rel = os.path.relpath(p, out_dir) if out_dir else str(p)
            lines += [f"![{p.stem}]({rel})", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class LambdaAxis:
    """Where each λ sits on a log x axis: λ = 0 cannot, so it takes the place `zero_at`, one decade below the
    smallest positive λ's decade, with its own tick "0" and an axis break (`break_at`) between it and the rest."""
    zero_at: float
    ticks: tuple[tuple[float, str], ...]  # (position, label)
    break_at: float | None  # None when no λ is 0
    limits: tuple[float, float]

    def position(self, ewc_lambda: float) -> float:
        return self.zero_at if ewc_lambda == 0 else ewc_lambda


def lambda_axis(lambdas: Sequence[float]) -> LambdaAxis:
    positive = [x for x in lambdas if x > 0]
    has_zero = any(x == 0 for x in lambdas)
    if not positive:
        return LambdaAxis(1.0, ((1.0, "0"),), None, (10 ** -0.5, 10 ** 0.5))
    low, high = math.floor(math.log10(min(positive))), math.floor(math.log10(max(positive)))
    step = max(1, math.ceil((high - low + 1) / 7))  # at most ~7 decade labels: 10^0 ... 10^12 would crowd 700 px
    ticks = [(10.0 ** k, f"$10^{{{k}}}$") for k in range(low, high + 1, step)]
    zero_at = 10.0 ** (low - 1)
    if has_zero:
        ticks.insert(0, (zero_at, "0"))
    left = (zero_at if has_zero else 10.0 ** low) / 10 ** 0.4  # the first decade tick stays in view
    return LambdaAxis(zero_at, tuple(ticks), 10.0 ** (low - 0.5) if has_zero else None,
                      (left, max(positive) * 10 ** 0.4))


def _apply_lambda_axis(ax, axis: LambdaAxis) -> None:
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
    from matplotlib.transforms import blended_transform_factory

    ax.set_xscale("log")
    ax.set_xlim(*axis.limits)
    ax.xaxis.set_major_locator(FixedLocator([p for p, _ in axis.ticks]))
    ax.xaxis.set_major_formatter(FixedFormatter([text for _, text in axis.ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    if axis.break_at is not None:  # "//" over the bottom spine: λ = 0 is not a point of the log scale
        ax.text(axis.break_at, 0, "//", transform=blended_transform_factory(ax.transData, ax.transAxes),
                ha="center", va="center", fontsize=11, clip_on=False, zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    ax.set_xlabel("EWC λ (log scale; 0 at the left)")


def _replay_groups(runs: Sequence[Run]) -> dict[float | None, list[Run]]:
    groups: dict[float | None, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.replay_weight, []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0.0)))


def _base_legend(base: Run) -> str:
    return "base" if base.label == "base" else f"base ({base.label})"


def _replay_legend(weight: float | None) -> str:
    return "no replay" if weight is None else f"replay {_replay_text(weight)}"


def _place_labels(ax, points: Sequence[tuple[float, float]], texts: Sequence[str]) -> None:
    """Annotate each point, trying offsets around it until the label overlaps no other label or point and stays
    inside the axes; the first offset when none fits. Call after the limits and layout are final."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    marker_px = 9 * ax.figure.dpi / 72
    taken = [Bbox.from_bounds(cx - marker_px / 2, cy - marker_px / 2, marker_px, marker_px)
             for cx, cy in (ax.transData.transform(point) for point in points)]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer))
    offsets = ((7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"),
               (-7, -5, "right", "top"), (0, 11, "center", "bottom"), (0, -11, "center", "top"))

    def annotate(x, y, text, offset):
        dx, dy, ha, va = offset
        note = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=9,
                           zorder=6)
        return note, note.get_window_extent(renderer).padded(2)

    for (x, y), text in zip(points, texts):
        for offset in offsets:
            note, box = annotate(x, y, text, offset)
            inside = ax.bbox.x0 <= box.x0 and box.x1 <= ax.bbox.x1 and ax.bbox.y0 <= box.y0 and box.y1 <= ax.bbox.y1
            if inside and not any(box.overlaps(other) for other in taken):
                break
            note.remove()
        else:  # nothing fits: the first offset after all
            note, box = annotate(x, y, text, offsets[0])
        taken.append(box)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=PLOT_DPI)


def _draw_lambda_panels(plt, names, value, ylabel, title, swept: Sequence[Run], base: Run | None, path: Path, *,
                        log_when_wide: bool) -> bool:
    if not names:
        return False
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    height = 4.2 if cols == 1 else 3.4
    fig, axes = plt.subplots(rows, cols, figsize=(FIGURE_WIDTH_INCHES, height * rows + 0.5), squeeze=False,
                             dpi=PLOT_DPI)
    groups = _replay_groups(swept)
    for ax, name in zip(axes.flat, names):
        measured = [r for r in swept if value(r, name) is not None]
        axis = lambda_axis([r.ewc_lambda for r in measured])
        for marker, (weight, group) in zip("osD^v<>", groups.items()):
            points = sorted((axis.position(r.ewc_lambda), value(r, name)) for r in group if r in measured)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker,
                        label=_replay_legend(weight) if len(groups) > 1 or weight is not None else None)
        _apply_lambda_axis(ax, axis)
        b = value(base, name) if base is not None else None
        if b is not None:
            ax.axhline(b, linestyle="--", color="gray", label=_base_legend(base))
        if log_when_wide:
            _log_scale_if_wide(ax, "y", [value(r, name) for r in measured] + ([b] if b is not None else []))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        ax.set_title(name)
        ax.set_ylabel(ylabel(name))
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _axis_label(role: str, metric: Metric, direction: str) -> str:
    if metric.lower_is_better:
        return f"{role}: {metric.describe()}\nlower is better, axis inverted: better {direction}"
    return f"{role}: {metric.describe()}\nbetter {direction}"


def _draw_pareto(plt, runs: Sequence[Run], base: Run | None, old: Metric, new: Metric, path: Path) -> bool:
    """Old metric on y, new on x; a perplexity axis is inverted (and logarithmic when wide) so that better is
    always up and right."""
    candidates = pareto_candidates(runs, base, old, new)
    base_point = None if base is None or old.value(base) is None or new.value(base) is None else \
        (new.value(base), old.value(base))
    if not candidates and base_point is None:
        return False
    fig, ax = plt.subplots(figsize=(FIGURE_WIDTH_INCHES, 5.4), dpi=PLOT_DPI)
    for marker, (weight, group) in zip("osD^v<>", _replay_groups(candidates).items()):
        ax.scatter([new.value(r) for r in group], [old.value(r) for r in group], marker=marker, s=55, zorder=3,
                   label=_replay_legend(weight))
    frontier = frontier_runs(runs, base, old, new)
    if frontier:
        line = sorted((new.value(r), old.value(r)) for r in frontier)
        ax.plot([p[0] for p in line], [p[1] for p in line], color="black", linewidth=1.2, zorder=2,
                label="Pareto frontier")
        ax.scatter([p[0] for p in line], [p[1] for p in line], s=160, facecolors="none", edgecolors="black",
                   linewidths=1.2, zorder=4)
    run_points = [(new.value(r), old.value(r)) for r in candidates]
    # A base that never saw the new language sits far from every run: the runs get the plot, and the base is drawn
    # at the edge, pinned where it lies off the plot, with its values in its label.
    pinned = base_point is not None and _far_outside(base_point, run_points)
    if base_point is not None and not pinned:
        ax.scatter([base_point[0]], [base_point[1]], marker="*", s=260, color="black", zorder=5,
                   label=_base_legend(base))
    everything = run_points + ([base_point] if base_point and not pinned else [])
    for metric, which, values in ((new, "x", [p[0] for p in everything]), (old, "y", [p[1] for p in everything])):
        if metric.lower_is_better:
            _log_scale_if_wide(ax, which, values)
    ax.margins(0.15)
    ax.autoscale_view()
    ax.set_xlim(*ax.get_xlim())  # fixed now, so that the label placement below sees the final transform
    ax.set_ylim(*ax.get_ylim())
    if new.lower_is_better:
        ax.invert_xaxis()
    if old.lower_is_better:
        ax.invert_yaxis()
    labelled_points = list(run_points)
    labels = [_point_label(r) for r in candidates]
    if base_point is not None:
        shown, text = base_point, "base"
        if pinned:
            (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
            shown = (min(max(base_point[0], x0), x1), min(max(base_point[1], y0), y1))
            text = f"base ({base_point[0]:.4g}, {base_point[1]:.4g}), off the plot"
        ax.scatter([shown[0]], [shown[1]], marker="*", s=260, color="black", zorder=5, clip_on=False,
                   label=_base_legend(base))
        labelled_points.append(shown)
        labels.append(text)
    ax.set_xlabel(_axis_label("new", new, "→"))
    ax.set_ylabel(_axis_label("old", old, "↑"))
    ax.set_title("Old knowledge vs new language, one point per run")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", framealpha=0.9)
    fig.tight_layout()
    _place_labels(ax, labelled_points, labels)
    _save(fig, path)
    plt.close(fig)
    return True


def _far_outside(point: tuple[float, float], others: Sequence[tuple[float, float]]) -> bool:
    """`point` lies more than the others' own span beyond them on some axis (the others would fill under a third of
    a plot that shows them all)."""
    if len(others) < 2:
        return False
    for axis in (0, 1):
        lo, hi = min(p[axis] for p in others), max(p[axis] for p in others)
        span = max(hi - lo, 1e-9 * max(abs(hi), 1.0))
        if point[axis] < lo - 2 * span or point[axis] > hi + 2 * span:
            return True
    return False


def _log_scale_if_wide(ax, which: str, values: Sequence[float]) -> None:
    """A log scale for a perplexity axis that spans a factor of 4 or more (a base that never saw the new language
    would squash every run into a corner), ticked at 1, 2, 3 and 5 per decade with plain numbers ("20", "50")
    rather than 2×10^1."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if not values or min(values) <= 0 or max(values) / min(values) < 4:
        return
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())


@dataclass
class DriftSeries:
    """A run's drift telemetry from its training metrics.jsonl: blocks, logging steps, and [step][block] values."""
    blocks: list[str]
    steps: list[int]
    fisher: list[list[float]]
    plain: list[list[float]]


def metrics_path(run: Run) -> Path | None:
    """RUN_DIR/metrics.jsonl of the run that produced the evaluated checkpoint (run.checkpoint is
    RUN_DIR/checkpoints/step_N), or None when the results name no checkpoint or the file is not there."""
    checkpoint = run.data.get("run", {}).get("checkpoint")
    if not isinstance(checkpoint, str) or not checkpoint:
        return None
    step_dir = Path(checkpoint)
    if not step_dir.is_absolute():
        step_dir = run.path.parent / step_dir
    path = step_dir.parent.parent / "metrics.jsonl"
    return path if path.is_file() else None


def load_drift(path: Path) -> DriftSeries | None:
    """The `drift` records of a metrics.jsonl (torn or foreign lines skipped), None when it has none. The blocks
    are those of the last record; records with other blocks (another model) are left out."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        drift = record.get("drift") if isinstance(record, dict) else None
        if isinstance(drift, dict) and _is_number(record.get("step")) and isinstance(drift.get("blocks"), list):
            records.append((int(record["step"]), drift))
    if not records:
        return None
    blocks = records[-1][1]["blocks"]
    by_step = {}
    for step, drift in records:  # a resumed run repeats steps: the later record wins
        if drift["blocks"] == blocks and len(drift.get("fisher", ())) == len(drift.get("plain", ())) == len(blocks):
            by_step[step] = drift
    steps = sorted(by_step)
    return DriftSeries([str(b) for b in blocks], steps, [by_step[s]["fisher"] for s in steps],
                       [by_step[s]["plain"] for s in steps])


def drift_of_runs(runs: Sequence[Run]) -> tuple[list[tuple[Run, DriftSeries]], list[Run]]:
    """(runs with drift telemetry and their series, runs without)."""
    found, missing = [], []
    for run in runs:
        path = metrics_path(run)
        series = load_drift(path) if path is not None else None
        if series is None:
            missing.append(run)
        else:
            found.append((run, series))
    return found, missing


def _sparse_ticks(ax, axis: str, labels: Sequence[str], most: int) -> None:
    """At most `most` ticks, the first and the last always labelled."""
    every = max(1, math.ceil(len(labels) / most))
    at = sorted(set(range(0, len(labels), every)) | {len(labels) - 1})
    if len(at) > 1 and at[-1] - at[-2] < every:  # the last would crowd its neighbour
        at.pop(-2)
    getattr(ax, f"set_{axis}ticks")(at)
    getattr(ax, f"set_{axis}ticklabels")([labels[i] for i in at])


def _draw_drift(plt, series: Sequence[tuple[Run, DriftSeries]], path: Path) -> bool:
    """One row per run: heat maps blocks × steps of the F-weighted and the plain drift, on one log colour scale
    per column (the runs compare by colour)."""
    if not series:
        return False
    from matplotlib.colors import LogNorm

    columns = (("fisher", "Σ F(θ − θ*)²"), ("plain", "‖θ − θ*‖²"))
    norms = []
    for kind, _ in columns:
        positive = [x for _, s in series for row in getattr(s, kind) for x in row if x > 0]
        low, high = (min(positive), max(positive)) if positive else (1e-30, 1.0)
        norms.append(LogNorm(vmin=low, vmax=max(high, low * 1.0001)))
    rows = len(series)
    fig, axes = plt.subplots(rows, 2, figsize=(FIGURE_WIDTH_INCHES, 0.8 + 2.6 * rows), squeeze=False)
    for number, ((run, s), row) in enumerate(zip(series, axes)):
        for ax, (kind, title), norm in zip(row, columns, norms):
            values = getattr(s, kind)  # [step][block]
            # (blocks, steps); a zero drift shows at the scale's floor
            grid = [[max(values[j][i], norm.vmin) for j in range(len(s.steps))] for i in range(len(s.blocks))]
            image = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", norm=norm,
                              cmap="viridis")
            fig.colorbar(image, ax=ax)
            # Column titles once; each row names its run in the label of its own plot (labels are long).
            ax.set_title(f"{title}\n{_point_label(run)}" if number == 0 else _point_label(run), fontsize="medium")
            ax.set_xlabel("step")
            _sparse_ticks(ax, "x", [str(x) for x in s.steps], 5)
            _sparse_ticks(ax, "y", s.blocks, 10)
    fig.suptitle("Drift from the anchor per block")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def draw_plots(runs: Sequence[Run], base: Run | None, out_dir: Path, *,
               old_new: tuple[Metric, Metric] | None = None,
               drift: Sequence[tuple[Run, DriftSeries]] = ()) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install 'gemma-ewc[plots]'") from None
    swept = [r for r in runs if r.ewc_lambda is not None and r is not base]
    if not swept:
        raise UserError("--plots needs at least one run with a lambda (evaluate with --lambda)")
    tasks, ppl_sets = _union(runs, "tasks"), _union(runs, "perplexity")
    metrics = {t: _primary(runs, t) for t in tasks}
    out_dir.mkdir(parents=True, exist_ok=True)

    def task_value(r, t):
        s = task_score(r, t, metrics[t])
        return None if s is None else 100 * s[0]

    written = []
    with plt.rc_context(PLOT_STYLE):
        if _draw_lambda_panels(plt, tasks, task_value, lambda t: f"{metrics[t]} (%)", "Accuracy vs EWC λ", swept,
                               base, out_dir / PLOT_FILES[0], log_when_wide=False):
            written.append(out_dir / PLOT_FILES[0])
        if _draw_lambda_panels(plt, ppl_sets, lambda r, n: ppl_value(r, n, "perplexity"), lambda n: "perplexity",
                               "Perplexity vs EWC λ", swept, base, out_dir / PLOT_FILES[1], log_when_wide=True):
            written.append(out_dir / PLOT_FILES[1])
        if old_new is not None and _draw_pareto(plt, runs, base, *old_new, out_dir / PLOT_FILES[2]):
            written.append(out_dir / PLOT_FILES[2])
        if _draw_drift(plt, drift, out_dir / PLOT_FILES[3]):
            written.append(out_dir / PLOT_FILES[3])
    return written


def write_report(paths: Sequence[Path], *, out: Path, plots: Path | None = None, base: str | None = None,
                 old: str | None = None, new: str | None = None) -> list[Path]:
    runs = load_runs(paths)
    old_new = choose_old_new(runs, old=old, new=new)  # before ordering: the defaults follow the files' order
    base_run = choose_base(runs, base)
    runs = order_runs(runs, base_run)
    drift, without_drift = drift_of_runs(runs) if plots is not None else ([], [])
    images = draw_plots(runs, base_run, plots, old_new=old_new, drift=drift) if plots is not None else []
    # the base (the pretrained model) was not trained here: it has no drift, and the note would only be noise
    without_drift = [r for r in without_drift if r is not base_run] if drift else []
    text = render_markdown(runs, base_run, plots=images, out_dir=out.parent, old_new=old_new,
                           without_drift=without_drift)
    with atomic_path(out) as tmp:
        tmp.write_text(text + "\n")
    return [out, *images]
