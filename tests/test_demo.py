"""A shortened `gemma-ewc demo`: the whole pipeline runs as a small sweep, and EWC forgets less of A while still
learning B."""

import json

import pytest

from trainer.demo import DemoSettings, demo, estimate_seconds, format_summary

SHORT = DemoSettings(documents=400, vocab_size=384, seq_len=96, batch_size=12, pretrain_steps=90,
                     continue_steps=50, fisher_samples=32)


@pytest.mark.slow
def test_short_demo_shows_less_forgetting_with_ewc(tmp_path):
    rows = demo(tmp_path, SHORT, lambdas=[100.0])  # λ = 0 is always swept too
    base, plain, ewc = rows
    assert [r["model"] for r in rows] == ["base", "000-lambda=0", "001-lambda=100"]
    assert [r["lambda"] for r in rows] == [None, 0.0, 100.0]
    # λ = 0 learns B and forgets A; λ > 0 forgets clearly less of A and still learns B.
    assert plain["ppl_b"] < base["ppl_b"] and plain["ppl_a"] > 1.2 * base["ppl_a"]
    assert ewc["ppl_a"] - base["ppl_a"] < 0.5 * (plain["ppl_a"] - base["ppl_a"])
    assert ewc["ppl_b"] < 0.5 * base["ppl_b"]
    for name in ("sweep/report.md", "sweep/perplexity_vs_lambda.png", "sweep/pareto.png", "ewc.safetensors",
                 "summary.json", "base.toml", "continue.toml", "sweep/runs/001-lambda=100/metrics.jsonl",
                 "sweep/models/001-lambda=100/model.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text()) == rows
    assert "| 001-lambda=100 | 100 |" in format_summary(rows)


def test_the_estimate_grows_with_the_work():
    assert 0 < estimate_seconds(SHORT, 1) < estimate_seconds(SHORT, 4)


def test_demo_rejects_a_missing_text_file(tmp_path):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="--text-a .* not found"):
        demo(tmp_path, SHORT, text_a=str(tmp_path / "nope.txt"))
