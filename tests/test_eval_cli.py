"""`gemma-ewc eval` and `gemma-ewc report` end to end on a tiny model and real items; one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import SHARED_DATA
from tests.eval_fixtures import make_model_dir
from trainer.cli import main

BENCH = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("cli"), seed=3)


@pytest.fixture
def texts(tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("The first short document.\nIt has two lines.\n\nA second one, about Vilnius.\n")
    lt = tmp_path / "lt.txt"
    lt.write_text("Vilnius yra Lietuvos sostinė.\n\nKaunas yra antras pagal dydį miestas.\n")
    return en, lt


def test_eval_writes_results_and_report_compares_runs(model_dir, texts, tmp_path, capsys):
    en, lt = texts
    arc = BENCH / "arc_easy" / "arc_easy_test.jsonl"
    wino = BENCH / "winogrande" / "winogrande_1.1_dev.jsonl"
    base_json, run_json = tmp_path / "base.json", tmp_path / "ewc.json"
    common = ["eval", "--model", str(model_dir), "--ppl", f"en={en}", f"lt={lt}", "--tasks", f"arc={arc}",
              str(wino), "--limit", "3", "--max-length", "256"]
    assert main(common + ["--out", str(base_json)]) == 0
    out = capsys.readouterr().out
    assert "en: perplexity" in out and "arc (arc, 0-shot): acc" in out and f"results written to {base_json}" in out
    res = json.loads(base_json.read_text())
    assert res["format"] == "gemma-ewc/eval-v1" and res["lambda"] is None and res["label"] == "model"
    assert len(res["model"]["fingerprint"]) == 64 and res["model"]["fingerprint_method"] == "sampled-v1"
    assert set(res["perplexity"]) == {"en", "lt"} and set(res["tasks"]) == {"arc", "winogrande_1.1_dev"}
    ppl = res["perplexity"]["en"]
    assert ppl["documents"] == 2 and ppl["bytes"] == len("The first short document.\nIt has two lines.".encode()) + \
        len("A second one, about Vilnius.".encode())
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll"] / ppl["tokens"]))
    arc_res = res["tasks"]["arc"]
    assert arc_res["n"] == 3 and arc_res["type"] == "arc" and arc_res["skipped"]["count"] == 0
    assert arc_res["stderr"]["acc"] == pytest.approx(
        math.sqrt(arc_res["scores"]["acc"] * (1 - arc_res["scores"]["acc"]) / 2))
    from trainer.fileio import sha256_file

    assert arc_res["sha256"] == sha256_file(arc)

    # The same weights again, as a lambda run: the report must flag that it is the same model.
    assert main(common + ["--out", str(run_json), "--label", "ewc-1e3", "--lambda", "1000"]) == 0
    capsys.readouterr()
    report, plots = tmp_path / "report.md", tmp_path / "plots"
    assert main(["report", str(run_json), str(base_json), "--out", str(report), "--plots", str(plots)]) == 0
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| model") or line.startswith("| ewc-1e3")]
    assert rows[0].startswith("| model (base) | – |") and rows[1].startswith("| ewc-1e3 | 1000 |")
    assert "| ewc-1e3 | 1000 | ±0.0 | ±0.0 | ±0.0 | ±0.0% | ±0.0% |" in text
    assert "evaluated the same weights" in text
    assert (plots / "accuracy_vs_lambda.png").read_bytes()[:4] == b"\x89PNG"
    assert (plots / "perplexity_vs_lambda.png").is_file()


def _error_of(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[0].startswith("gemma-ewc ")
    return "\n".join(err)


def test_bad_inputs_are_one_clear_error(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "holds no text" in _error_of(["eval", "--model", str(model_dir), "--ppl", str(empty)], capsys)
    assert "nothing to evaluate" in _error_of(["eval", "--model", str(model_dir)], capsys)
    assert "not found" in _error_of(["eval", "--model", str(model_dir), "--tasks", str(tmp_path / "nope.jsonl")],
                                    capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    assert "bad.jsonl:1 is not valid JSON" in _error_of(["eval", "--model", str(model_dir), "--tasks", str(bad)],
                                                        capsys)
    assert "--max-length must be at least 1" in _error_of(
        ["eval", "--model", str(model_dir), "--ppl", str(empty), "--max-length", "0"], capsys)
    assert "model directory" in _error_of(["eval", "--model", str(tmp_path / "missing"), "--ppl", str(empty)],
                                          capsys)
    arc = BENCH / "arc_easy" / "arc_easy_test.jsonl"
    assert "two inputs are named" in _error_of(["eval", "--model", str(model_dir), "--tasks", f"x={arc}",
                                                f"x={arc}"], capsys)
    assert "is not a results JSON" in _error_of(["report", str(bad), "--out", str(tmp_path / "r.md")], capsys)
    other = tmp_path / "other.json"
    other.write_text('{"results": {}}')
    assert "not a gemma-ewc eval results file" in _error_of(["report", str(other), "--out", str(tmp_path / "r.md")],
                                                            capsys)


def test_skipped_items_are_reported_on_stderr_and_in_results(model_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (BENCH / "arc_easy" / "arc_easy_test.jsonl").open()][:3]
    rows[0]["answer_idx"] = -1
    path = tmp_path / "arc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--tasks", str(path), "--out", str(out),
                 "--max-length", "256"]) == 0
    err = capsys.readouterr().err
    assert "arc: skipped 1 item(s) that cannot be scored, e.g. arc.jsonl:1: answer_idx -1 is out of range" in err
    res = json.loads(out.read_text())["tasks"]["arc"]
    assert res["n"] == 2 and res["skipped"]["count"] == 1


def test_fewshot_files_by_type_or_by_name(model_dir, tmp_path, capsys):
    from trainer.fileio import sha256_file

    rows = (BENCH / "gsm8k" / "gsm8k_test.jsonl").read_text().splitlines(keepends=True)
    shots, test = tmp_path / "shots.jsonl", tmp_path / "test.jsonl"
    shots.write_text("".join(rows[:2]))
    test.write_text("".join(rows[2:3]))
    out = tmp_path / "r.json"
    base = ["eval", "--model", str(model_dir), "--max-length", "1024", "--max-new-tokens", "2", "--out", str(out),
            "--overwrite"]
    assert main(base + ["--tasks", str(test), "--fewshot-file", str(shots), "--num-fewshot", "1"]) == 0
    res = json.loads(out.read_text())["tasks"]["test"]
    assert res["type"] == "gsm8k" and res["num_fewshot"] == 1 and res["fewshot_sha256"] == sha256_file(shots)
    capsys.readouterr()
    assert main(base + ["--tasks", f"math={test}", "--fewshot-file", f"math={shots}"]) == 2  # GSM8K's default: 5
    assert "math: 5-shot asked but the few-shot file(s)" in capsys.readouterr().err
    assert main(base + ["--tasks", f"math={test}", "--fewshot-file", f"math={shots}", "--num-fewshot", "2"]) == 0
    assert json.loads(out.read_text())["tasks"]["math"]["num_fewshot"] == 2
    capsys.readouterr()
    assert main(base + ["--tasks", str(test), "--fewshot-file", f"other={shots}"]) == 2
    assert "--fewshot-file names task(s) ['other']" in capsys.readouterr().err


def test_invalid_utf8_in_a_corpus_is_replaced_and_reported(model_dir, tmp_path, capsys):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes("Labas rytas.\n\nAntras dokumentas \xff\xfe su klaida.\n".encode("latin-1"))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--ppl", str(corpus), "--max-length", "64", "--out", str(out)]) == 0
    assert "character(s) of invalid UTF-8" in capsys.readouterr().err
    res = json.loads(out.read_text())["perplexity"]["bad"]
    assert res["replaced_characters"] > 0 and res["documents"] == 2 and res["kind"] == "text"


def test_eval_scores_at_the_trained_context_unless_asked(model_dir, texts, tmp_path, capsys):
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(model_dir, trained)
    run = {"label": "lt-ewc", "ewc_lambda": 10.0, "checkpoint": "/runs/lt-ewc/checkpoints/step-00000004",
           "seq_len": 16, "data_stores": ["/data/lt", "/data/en"], "data_weights": [0.95, 0.05], "step": 4}
    (trained / "gemma-ewc.json").write_text(json.dumps(run))
    en, _ = texts
    out = tmp_path / "r.json"
    base = ["eval", "--ppl", f"en={en}", "--out", str(out), "--overwrite"]

    assert main(base + ["--model", str(trained)]) == 0
    err = capsys.readouterr().err
    assert "gemma-ewc eval: context 16 tokens (trained seq_len, gemma-ewc.json)" in err and "warning" not in err
    res = json.loads(out.read_text())
    assert res["run"] == run and res["label"] == "lt-ewc" and res["lambda"] == 10.0
    assert (res["settings"]["max_length"], res["settings"]["stride"], res["settings"]["context_source"]) == \
        (16, 8, "trained seq_len")

    assert main(base + ["--model", str(trained), "--max-length", "12"]) == 0
    assert "context 12 tokens (--max-length)" in capsys.readouterr().err
    assert json.loads(out.read_text())["settings"]["context_source"] == "max-length option"

    assert main(base + ["--model", str(trained), "--max-length", "64"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--max-length 64 is longer than the 16 tokens the model was trained at" in \
        warnings[0]
    assert json.loads(out.read_text())["settings"]["max_length"] == 64

    # Without gemma-ewc.json: the model's own context, and an empty "run".
    assert main(base + ["--model", str(model_dir)]) == 0
    assert "(max_position_embeddings, config.json" in capsys.readouterr().err
    res = json.loads(out.read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert res["run"] == {} and res["settings"]["context_source"] == "max_position_embeddings"
    assert res["settings"]["max_length"] == config["max_position_embeddings"]

    gsm8k = BENCH / "gsm8k" / "gsm8k_test.jsonl"
    assert "--max-new-tokens (256) must be below the context 16 tokens (trained seq_len" in _error_of(
        base + ["--model", str(trained), "--tasks", str(gsm8k), "--limit", "1"], capsys)
    (trained / "gemma-ewc.json").write_text(json.dumps({**run, "seq_len": "long"}))
    assert 'gemma-ewc.json: "seq_len" must be a positive integer' in _error_of(base + ["--model", str(trained)],
                                                                              capsys)
