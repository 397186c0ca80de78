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
