"""`gemma-ewc report`: compare eval results of several runs (the base model and each λ) at a glance.

The Markdown report has two tables, runs × tasks: the scores (each task's primary metric, in percent, ± its
standard error; perplexity and bits per byte of each text set), and the change relative to the base run
(percentage points per task, their mean, and the relative change of perplexity): forgetting is negative, gain
positive. Rows: the base first, then runs by increasing λ. A "Comparability" section lists what differs between
runs that should not (task files, few-shot counts, context length), so a table never silently mixes setups.

The base is `--base` (a label or a results file), or else the one run recorded without λ (the pretrained model).

With `--plots DIR` (needs matplotlib): accuracy_vs_lambda.png (one panel per task) and perplexity_vs_lambda.png
(one panel per text set, i.e. per language), each with the base as a dashed line, like the reference study's figures.
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
PLOT_FILES = ("accuracy_vs_lambda.png", "perplexity_vs_lambda.png")  # what --plots DIR receives


@dataclass
class Run:
    path: Path
    label: str
    ewc_lambda: float | None
    data: dict


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
    for field in ("model", "settings", "perplexity", "tasks"):
        if not isinstance(data.get(field, {}), dict):
            raise bad(field, data[field], "an object")
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
    rest.sort(key=lambda r: (r.ewc_lambda is None, r.ewc_lambda if r.ewc_lambda is not None else 0.0, r.label))
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


def _lambda_text(lam: float | None) -> str:
    if lam is None:
        return "–"
    return f"{lam:g}"


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
    for key in ("max_length", "stride", "limit"):
        values = {r.label: r.data.get("settings", {}).get(key) for r in runs}
        if len(set(map(str, values.values()))) > 1:
            notes.append(f"settings differ in {key}: " + ", ".join(f"{k}: {v}" for k, v in values.items()))
    return notes


def render_markdown(runs: Sequence[Run], base: Run | None, *, plots: Sequence[Path] = (),
                    out_dir: Path | None = None) -> str:
    tasks = _union(runs, "tasks")
    ppl_sets = _union(runs, "perplexity")
    metrics = {t: _primary(runs, t) for t in tasks}
    lines = ["# Evaluation report", ""]
    base_text = base.label if base else "none (give --base, or evaluate the pretrained model without --lambda)"
    lines.append(f"{len(runs)} run(s); base: {base_text}.")
    lines.append("Scores in percent (± standard error); perplexity (ppl) per token of the model's tokenizer, "
                 "bits per byte (bpb) independent of it.")
    lines.append("")
    header = ["run", "λ"] + [f"{t} ({metrics[t]})" for t in tasks]
    header += [h for name in ppl_sets for h in (f"{name} ppl", f"{name} bpb")]
    rows = []
    for r in runs:
        row = [r.label + (" (base)" if r is base else ""), _lambda_text(r.ewc_lambda)]
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
        header = ["run", "λ"] + [f"Δ {t}" for t in tasks] + ["mean Δ"] + [f"Δ {n} ppl" for n in ppl_sets]
        rows = []
        for r in runs[1:]:
            row = [r.label, _lambda_text(r.ewc_lambda)]
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

    notes = comparability(runs, tasks, ppl_sets)
    lines += ["## Comparability", ""]
    lines += [f"- {n}" for n in notes] if notes else ["Every run used the same task files, few-shot counts and "
                                                      "settings."]
    lines.append("")
    lines += ["## Runs", "", _table(["run", "λ", "results", "model", "fingerprint"],
                                    [[r.label, _lambda_text(r.ewc_lambda), str(r.path), r.data["model"].get("path", ""),
                                      str(r.data["model"].get("fingerprint", ""))[:16]] for r in runs]), ""]
    if plots:
        lines += ["## Plots", ""]
        for p in plots:
            rel = os.path.relpath(p, out_dir) if out_dir else str(p)
            lines += [f"![{p.stem}]({rel})", ""]
    return "\n".join(lines)


def _lambda_axis(ax, lambdas: Sequence[float]) -> None:
    positive = [x for x in lambdas if x > 0]
    if positive and max(positive) / min(positive) >= 100:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("EWC λ")


def draw_plots(runs: Sequence[Run], base: Run | None, out_dir: Path) -> list[Path]:
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
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)

    def panels(names, value, ylabel, title, filename):
        if not names:
            return
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            points = sorted((r.ewc_lambda, value(r, name)) for r in swept if value(r, name) is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
                _lambda_axis(ax, [p[0] for p in points])
            b = value(base, name) if base is not None else None
            if b is not None:
                ax.axhline(b, linestyle="--", color="gray", label=f"base ({base.label})")
                ax.legend(fontsize="small")
            ax.set_title(name)
            ax.set_ylabel(ylabel(name))
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / filename
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(path)

    def task_value(r, t):
        s = task_score(r, t, metrics[t])
        return None if s is None else 100 * s[0]

    panels(tasks, task_value, lambda t: f"{metrics[t]} (%)", "Accuracy vs EWC λ", PLOT_FILES[0])
    panels(ppl_sets, lambda r, n: ppl_value(r, n, "perplexity"), lambda n: "perplexity",
           "Perplexity vs EWC λ", PLOT_FILES[1])
    return written


def write_report(paths: Sequence[Path], *, out: Path, plots: Path | None = None, base: str | None = None) -> list[Path]:
    runs = load_runs(paths)
    base_run = choose_base(runs, base)
    runs = order_runs(runs, base_run)
    images = draw_plots(runs, base_run, plots) if plots is not None else []
    text = render_markdown(runs, base_run, plots=images, out_dir=out.parent)
    with atomic_path(out) as tmp:
        tmp.write_text(text + "\n")
    return [out, *images]
