"""`gemma-ewc report`: base detection, row order, scores and deltas, comparability notes, plots."""

from __future__ import annotations

import json
import sys

import pytest

from trainer.errors import UserError
from trainer.evaluate.report import write_report


def _results(label, lam, *, arc, mmlu, ppl, fingerprint=None, arc_sha="a" * 64, fewshot=0):
    return {
        "format": "gemma-ewc/eval-v1", "label": label, "lambda": lam,
        "model": {"path": f"/runs/{label}", "fingerprint": fingerprint or label * 8, "tokenizer_sha256": "t"},
        "settings": {"max_length": 4096, "stride": 2048, "limit": None},
        "perplexity": {"lt": {"sha256": "p", "perplexity": ppl, "bits_per_byte": ppl / 10}},
        "tasks": {
            "arc_lt": {"type": "arc", "primary": "acc", "sha256": arc_sha, "num_fewshot": fewshot, "n": 100,
                       "scores": {"acc": arc, "acc_norm": arc}, "stderr": {"acc": 0.05, "acc_norm": 0.05}},
            "mmlu_lt": {"type": "mmlu", "primary": "acc", "sha256": "m", "num_fewshot": 5, "n": 100,
                        "scores": {"acc": mmlu}, "stderr": {"acc": 0.04}},
        },
    }


def _write(tmp_path, *results):
    paths = []
    for r in results:
        p = tmp_path / f"{r['label']}.json"
        p.write_text(json.dumps(r))
        paths.append(p)
    return paths


def _row(text, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {label} "))


def test_base_first_then_by_lambda_with_deltas(tmp_path):
    runs = [_results("ewc-1e4", 1e4, arc=0.50, mmlu=0.41, ppl=9.0), _results("ft", 0.0, arc=0.40, mmlu=0.30, ppl=8.0),
            _results("gemma", None, arc=0.55, mmlu=0.45, ppl=20.0), _results("ewc-1e2", 100.0, arc=0.45, mmlu=0.38,
                                                                             ppl=8.5)]
    out = tmp_path / "report.md"
    write_report(_write(tmp_path, *runs), out=out)
    text = out.read_text()
    scores = text.split("## Scores")[1].split("##")[0]
    order = [line.split("|")[1].strip() for line in scores.splitlines() if line.startswith("| ") and "λ" not in line]
    assert order == ["gemma (base)", "ft", "ewc-1e2", "ewc-1e4"]
    assert _row(scores, "gemma (base)") == "| gemma (base) | – | 55.0 ± 5.0 | 45.0 ± 4.0 | 20 | 2.0000 |"
    deltas = text.split("## Change vs base")[1].split("##")[0]
    # ft: arc 40 - 55 = -15 points, mmlu 30 - 45 = -15, mean -15; perplexity 8/20 - 1 = -60 %.
    assert _row(deltas, "ft") == "| ft | 0 | −15.0 | −15.0 | −15.0 | −60.0% |"
    # ewc-1e4: arc -5, mmlu -4, mean -4.5.
    assert _row(deltas, "ewc-1e4") == "| ewc-1e4 | 10000 | −5.0 | −4.0 | −4.5 | −55.0% |"
    assert "Every run used the same task files" in text


def test_base_by_option_and_comparability_notes(tmp_path):
    runs = [_results("a", None, arc=0.5, mmlu=0.4, ppl=10.0), _results("b", None, arc=0.6, mmlu=0.5, ppl=11.0,
                                                                     arc_sha="b" * 64, fewshot=5)]
    paths = _write(tmp_path, *runs)
    with pytest.raises(UserError, match="all lack a lambda: say which is the base"):
        write_report(paths, out=tmp_path / "r.md")
    write_report(paths, out=tmp_path / "r.md", base="b")
    text = (tmp_path / "r.md").read_text()
    assert _row(text, "b (base)")
    assert _row(text.split("## Change vs base")[1], "a") == "| a | – | −10.0 | −10.0 | −10.0 | −9.1% |"
    assert "arc_lt: runs differ in task files" in text and "arc_lt: runs differ in few-shot counts" in text
    with pytest.raises(UserError, match="--base 'c' is neither the label nor the file"):
        write_report(paths, out=tmp_path / "r.md", base="c")
    write_report(paths, out=tmp_path / "r2.md", base=str(paths[0]))
    assert _row((tmp_path / "r2.md").read_text(), "a (base)")


def test_without_a_base_there_are_no_deltas(tmp_path):
    paths = _write(tmp_path, _results("x", 1.0, arc=0.5, mmlu=0.4, ppl=10.0),
                   _results("y", 2.0, arc=0.5, mmlu=0.4, ppl=10.0))
    write_report(paths, out=tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "base: none" in text and "## Change vs base" not in text


def test_bad_results_files(tmp_path):
    a = _results("same", 1.0, arc=0.5, mmlu=0.4, ppl=10.0)
    p1, = _write(tmp_path, a)
    p2 = tmp_path / "other.json"
    p2.write_text(json.dumps(a))
    with pytest.raises(UserError, match="two results are labelled 'same'"):
        write_report([p1, p2], out=tmp_path / "r.md")
    with pytest.raises(UserError, match="not found"):
        write_report([tmp_path / "missing.json"], out=tmp_path / "r.md")


def test_plots_are_drawn_and_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    paths = _write(tmp_path, _results("base", None, arc=0.55, mmlu=0.45, ppl=20.0),
                   _results("l1", 1.0, arc=0.5, mmlu=0.4, ppl=10.0), _results("l2", 1e6, arc=0.52, mmlu=0.41, ppl=12.0))
    written = write_report(paths, out=tmp_path / "r.md", plots=tmp_path / "plots")
    assert [p.name for p in written] == ["r.md", "accuracy_vs_lambda.png", "perplexity_vs_lambda.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written[1:])
    assert "![accuracy_vs_lambda](plots/accuracy_vs_lambda.png)" in written[0].read_text()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"--plots needs matplotlib"):
        write_report(paths, out=tmp_path / "r.md", plots=tmp_path / "plots")


# The λ study: base, λ = 0, 100, 10^4, 10^6 without replay, λ = 0 and 10^4 with 5 % replay; en is old, lt new.
STUDY = [  # label, λ, data_weights, en ppl, lt ppl, arc accuracy
    ("base", None, None, 20.0, 400.0, 0.60),
    ("l0", 0.0, None, 45.0, 30.0, 0.40),
    ("l100", 100.0, None, 44.0, 31.0, 0.41),  # worse than l0-replay on both: dominated
    ("l1e4", 1e4, None, 30.0, 33.0, 0.48),
    ("l1e6", 1e6, None, 21.0, 90.0, 0.58),
    ("r0", 0.0, [0.95, 0.05], 35.0, 30.5, 0.45),
    ("r1e4", 1e4, [0.95, 0.05], 30.0, 33.0, 0.47),  # ties l1e4 exactly on en/lt: both stay on the frontier
]


def _study(tmp_path):
    results = []
    for label, lam, weights, en, lt, arc in STUDY:
        r = _results(label, lam, arc=arc, mmlu=0.4, ppl=lt)
        r["perplexity"] = {"en": {"sha256": "e", "perplexity": en, "bits_per_byte": en / 10}, **r["perplexity"]}
        r["run"] = {"label": label, "ewc_lambda": lam, "data_weights": weights, "seq_len": 128}
        results.append(r)
    return _write(tmp_path, *results)


def _section(text, title):
    return text.split(f"## {title}")[1].split("\n## ")[0]


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_pareto_plot_and_frontier_of_a_study(tmp_path):
    pytest.importorskip("matplotlib")
    written = write_report(_study(tmp_path), out=tmp_path / "r.md", plots=tmp_path / "plots")
    assert [p.name for p in written] == ["r.md", "accuracy_vs_lambda.png", "perplexity_vs_lambda.png", "pareto.png"]
    for image in written[1:]:
        width, height = _png_size(image)
        assert 700 <= width <= 1000 and height > 300, (image.name, width, height)  # ~README width at 130 dpi
    text = written[0].read_text()
    frontier = _section(text, "Pareto frontier")
    assert "Old knowledge: en (perplexity), lower is better; new language: lt (perplexity), lower is better" in frontier
    rows = [line.split("|")[1].strip() for line in frontier.splitlines() if line.startswith("| ")][1:]
    assert rows == ["l0", "r0", "l1e4", "r1e4", "l1e6"]  # not l100 (dominated by r0), not the base
    assert _row(frontier, "r0") == "| r0 | 0 | 5% | 35 | 30.5 |"
    assert "Pareto plot: Old knowledge: en (perplexity)" in _section(text, "Plots")
    assert "![pareto](plots/pareto.png)" in text
    # The replay column shows in every table of a replay study; the base has none.
    assert _row(_section(text, "Scores"), "base (base)").startswith("| base (base) | – | – | 60.0 ± 5.0 |")
    assert _row(_section(text, "Change vs base"), "l1e6").startswith("| l1e6 | 1e+06 | – | −2.0 |")


def test_point_labels_carry_lambda_and_replay(tmp_path):
    from trainer.evaluate.report import _point_label, load_runs

    labels = {r.label: _point_label(r) for r in load_runs(_study(tmp_path))}
    assert labels == {"base": "base", "l0": "λ=0", "l100": "λ=100", "l1e4": "λ=1e4", "l1e6": "λ=1e6",
                      "r0": "λ=0, replay 5%", "r1e4": "λ=1e4, replay 5%"}


def test_frontier_keeps_exactly_the_non_dominated_points():
    from trainer.evaluate.report import pareto_frontier

    both_lower = [(1, 5), (2, 4), (2, 4), (3, 3), (3, 5), (1, 6), (4, 3)]
    # (3, 5) loses to (2, 4); (1, 6) to (1, 5) (a tie on x, worse on y); (4, 3) to (3, 3); the equal pair stays.
    assert pareto_frontier(both_lower, lower_is_better=(True, True)) == [0, 1, 2, 3]
    ppl_and_accuracy = [(10, 50), (12, 60), (12, 55), (9, 40), (10, 50), (15, 60)]
    # Perplexity lower is better, accuracy higher: (12, 55) and (15, 60) lose to (12, 60).
    assert pareto_frontier(ppl_and_accuracy, lower_is_better=(True, False)) == [0, 1, 3, 4]
    assert pareto_frontier([(p[1], p[0]) for p in ppl_and_accuracy], lower_is_better=(False, True)) == [0, 1, 3, 4]
    assert pareto_frontier([(70, 60), (80, 50), (60, 60)], lower_is_better=(False, False)) == [0, 1]
    assert pareto_frontier([], lower_is_better=(True, True)) == []


def test_frontier_on_random_points_is_undominated_and_covers_the_rest(seed):
    import random

    from trainer.evaluate.report import pareto_frontier

    rng = random.Random(seed)
    points = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(40)]  # small ranges: many ties
    keep = set(pareto_frontier(points, lower_is_better=(True, False)))

    def beats(a, b):  # a at most b's perplexity (x) and at least its accuracy (y), strictly on one
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    for i, p in enumerate(points):
        beaten = any(beats(q, p) for q in points)
        assert beaten == (i not in keep), (p, sorted(points[k] for k in keep))


def test_lambda_axis_puts_zero_at_the_left_edge_with_its_own_tick():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.evaluate.report import _apply_lambda_axis, lambda_axis

    axis = lambda_axis([1e6, 0.0, 100.0, 1e4, 1e12])
    assert axis.position(0.0) == axis.zero_at == 10.0  # one decade below 10^2
    assert axis.limits[0] < axis.zero_at < axis.break_at < 100.0
    assert axis.ticks[0] == (10.0, "0") and all(p > axis.zero_at for p, _ in axis.ticks[1:])
    assert len(axis.ticks) <= 8  # 10^2 ... 10^12 thinned so that the labels fit
    assert lambda_axis([0.5, 0.0]).zero_at == pytest.approx(0.01)
    without_zero = lambda_axis([10.0, 1000.0])
    assert without_zero.break_at is None and "0" not in [t for _, t in without_zero.ticks]
    one_decade = lambda_axis([300.0, 500.0])  # its only tick, 10^2, lies below both points yet in view
    assert one_decade.ticks == ((100.0, "$10^{2}$"),) and one_decade.limits[0] < 100.0 < 500.0 < one_decade.limits[1]
    only_zero = lambda_axis([0.0])
    assert only_zero.ticks == ((only_zero.zero_at, "0"),)

    fig, ax = plt.subplots()
    ax.plot([axis.position(x) for x in (0.0, 100.0, 1e12)], [1, 2, 3])
    _apply_lambda_axis(ax, axis)
    fig.canvas.draw()
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] < 10.0
    labels = [(t.get_position()[0], t.get_text()) for t in ax.get_xticklabels()]
    assert labels[0] == (10.0, "0") and labels[1] == (100.0, "$10^{2}$")
    assert any(text.get_text() == "//" for text in ax.texts)  # the break mark between 0 and the log scale
    plt.close(fig)


def _cli_error(argv, capsys):
    from trainer.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_old_and_new_through_the_cli(tmp_path, capsys):
    from trainer.cli import main

    paths = [str(p) for p in _study(tmp_path)]
    out = tmp_path / "r.md"
    assert main(["report", *paths, "--out", str(out)]) == 0  # two perplexity sets: en (first) old, lt new
    assert "Old knowledge: en (perplexity), lower is better; new language: lt" in out.read_text()
    assert main(["report", *paths, "--out", str(out), "--overwrite", "--new", "en"]) == 0  # --old: the other set
    assert "Old knowledge: lt (perplexity), lower is better; new language: en" in out.read_text()
    # Mixed axes: the old language's accuracy (higher is better) against the new language's perplexity.
    assert main(["report", *paths, "--out", str(out), "--overwrite", "--old", "arc_lt", "--new", "lt"]) == 0
    frontier = _section(out.read_text(), "Pareto frontier")
    assert "Old knowledge: arc_lt (acc %), higher is better; new language: lt (perplexity)" in frontier
    rows = [line.split("|")[1].strip() for line in frontier.splitlines() if line.startswith("| ")][1:]
    assert rows == ["l0", "r0", "l1e4", "l1e6"]  # r1e4 (47 %) now loses to l1e4 (48 %) at the same lt
    capsys.readouterr()

    error = _cli_error(["report", *paths, "--out", str(out), "--overwrite", "--old", "welsh", "--new", "lt"], capsys)
    assert "--old 'welsh' is neither a perplexity set nor a task" in error
    assert "perplexity sets: en, lt; tasks: arc_lt, mmlu_lt" in error
    error = _cli_error(["report", *paths, "--out", str(out), "--overwrite", "--new", "nope"], capsys)
    assert "--new 'nope'" in error
    assert "both 'en'" in _cli_error(["report", *paths, "--out", str(out), "--overwrite", "--old", "en", "--new",
                                      "en"], capsys)


def test_without_old_and_new_the_report_says_how_to_get_the_frontier(tmp_path):
    pytest.importorskip("matplotlib")
    paths = _write(tmp_path, _results("base", None, arc=0.55, mmlu=0.45, ppl=20.0),
                   _results("l0", 0.0, arc=0.5, mmlu=0.4, ppl=10.0))
    written = write_report(paths, out=tmp_path / "r.md", plots=tmp_path / "plots")
    assert "pareto.png" not in [p.name for p in written]  # one perplexity set: old and new are not implied
    assert "Give --old NAME and --new NAME" in _section(written[0].read_text(), "Pareto frontier")
    with pytest.raises(UserError, match="--old lt needs --new too"):
        write_report(paths, out=tmp_path / "r.md", old="lt")
    written = write_report(paths, out=tmp_path / "r.md", plots=tmp_path / "plots", old="mmlu_lt", new="lt")
    assert _png_size(written[-1])[0] > 700 and written[-1].name == "pareto.png"


def test_bad_data_weights_name_the_field(tmp_path):
    r = _results("x", 1.0, arc=0.5, mmlu=0.4, ppl=10.0)
    r["run"] = {"data_weights": "0.9,0.1"}
    with pytest.raises(UserError, match=r"x.json: field run.data_weights is \"0.9,0.1\""):
        write_report(_write(tmp_path, r), out=tmp_path / "r.md")


def test_a_base_far_from_the_runs_is_pinned_to_the_edge_not_squashing_them():
    from trainer.evaluate.report import _far_outside

    runs = [(22.0, 38.0), (30.0, 28.0), (26.0, 19.0)]
    assert _far_outside((83.0, 16.6), runs)  # 53 beyond a span of 8 on the new-language axis
    assert not _far_outside((27.0, 40.0), runs)  # within twice the spans: drawn where it is
    assert not _far_outside((83.0, 16.6), runs[:1])  # one run has no span to speak of


def test_a_decoupled_run_says_so_in_its_point_label():
    from pathlib import Path

    from trainer.evaluate.report import Run, _point_label

    coupled = Run(Path("a.json"), "a", 10.0, {"run": {"ewc_mode": "coupled", "data_weights": [0.9, 0.1]}})
    decoupled = Run(Path("b.json"), "b", 10.0, {"run": {"ewc_mode": "decoupled"}})
    assert _point_label(coupled) == "λ=10, replay 10%"
    assert _point_label(decoupled) == "λ=10 decoupled"
def _metrics_run(tmp_path, name, drift_by_step, *, blocks=("embedding", "block 0", "block 1", "final_norm")):
    """A run directory as `train` leaves it: RUN_DIR/metrics.jsonl and RUN_DIR/checkpoints/step_N; returns the
    step directory (what eval records as run.checkpoint)."""
    run_dir = tmp_path / "runs" / name
    step_dir = run_dir / "checkpoints" / "step_6"
    step_dir.mkdir(parents=True)
    lines = []
    for step, scale in drift_by_step:
        record = {"step": step, "loss": 1.0, "ewc_penalty": 0.1}
        if scale is not None:
            record["drift"] = {"blocks": list(blocks), "fisher": [scale * (i + 1) for i in range(len(blocks))],
                               "plain": [10 * scale * (i + 1) for i in range(len(blocks))]}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 7, \"torn")
    return step_dir


def test_drift_per_block_plot_from_the_runs_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.evaluate.report import drift_of_runs, load_runs

    results = [_results("base", None, arc=0.55, mmlu=0.45, ppl=20.0),
               _results("l1", 1.0, arc=0.5, mmlu=0.4, ppl=10.0), _results("l2", 1e6, arc=0.52, mmlu=0.41, ppl=12.0),
               _results("l0", 0.0, arc=0.4, mmlu=0.3, ppl=9.0), _results("gone", 5.0, arc=0.4, mmlu=0.3, ppl=9.0)]
    results[1]["run"] = {"checkpoint": str(_metrics_run(tmp_path, "l1", [(2, 1e-6), (4, 1e-4), (6, 0.0)]))}
    results[2]["run"] = {"checkpoint": str(_metrics_run(tmp_path, "l2", [(2, 1e-9), (4, 1e-8), (4, 2e-8)]))}
    results[3]["run"] = {"checkpoint": str(_metrics_run(tmp_path, "l0", [(2, None), (4, None)]))}  # no EWC
    results[4]["run"] = {"checkpoint": str(tmp_path / "nowhere" / "checkpoints" / "step_1")}
    paths = _write(tmp_path, *results)

    found, missing = drift_of_runs(load_runs(paths))
    assert [r.label for r, _ in found] == ["l1", "l2"] and [r.label for r in missing] == ["base", "l0", "gone"]
    l1, l2 = found[0][1], found[1][1]
    assert l1.blocks == ["embedding", "block 0", "block 1", "final_norm"] and l1.steps == [2, 4, 6]
    assert l1.fisher[1] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4]) and l1.plain[2] == [0.0] * 4
    assert l2.steps == [2, 4] and l2.fisher[1][0] == pytest.approx(2e-8)  # a resumed run's repeat: the later

    written = write_report(paths, out=tmp_path / "r.md", plots=tmp_path / "plots")
    plot = tmp_path / "plots" / "drift_per_block.png"
    assert plot in written and _png_size(plot)[0] == 910  # 7 in at 130 dpi
    text = (tmp_path / "r.md").read_text()
    assert "![drift_per_block](plots/drift_per_block.png)" in text
    assert "No drift telemetry (training metrics.jsonl not found, or trained without EWC): l0, gone." in text


def test_no_drift_plot_without_telemetry(tmp_path):
    pytest.importorskip("matplotlib")
    paths = _write(tmp_path, _results("base", None, arc=0.55, mmlu=0.45, ppl=20.0),
                   _results("l1", 1.0, arc=0.5, mmlu=0.4, ppl=10.0))
    written = write_report(paths, out=tmp_path / "r.md", plots=tmp_path / "plots")
    assert all(p.name != "drift_per_block.png" for p in written)
    text = (tmp_path / "r.md").read_text()
    assert "drift_per_block" not in text and "Drift per block" not in text and "No drift telemetry" not in text
