"""The lm-evaluation-harness adapter: its methods called directly against hand computations (skipped without
lm-eval), and importing it without lm-eval."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, SHARED_DATA
from tests.eval_fixtures import hand_loglikelihood, make_model_dir


def test_the_adapter_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import trainer.evaluate.lm_eval_adapter as a\n"
            "assert not a.HAVE_LM_EVAL\n"
            "try:\n    a.GemmaEWCLM('x')\nexcept ImportError as e:\n    print('hint:', e)\n"
            "sys.exit(a.main([]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "hint: the lm-eval adapter needs lm-evaluation-harness" in proc.stdout
    assert "pip install 'gemma-ewc[eval]'" in proc.stderr


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    import trainer.evaluate.lm_eval_adapter as adapter

    cls = get_model("gemma-ewc")
    assert cls is adapter.GemmaEWCLM
    model_dir = make_model_dir(tmp_path_factory.mktemp("lm_eval"), seed=11)
    with pytest.raises(ValueError, match=r"unknown gemma-ewc model argument\(s\) \['dytpe'\]"):
        cls.create_from_arg_string(f"pretrained={model_dir},dytpe=float32")
    return cls.create_from_arg_string(f"pretrained={model_dir},dtype=float32,max_length=48",
                                      {"batch_size": 2, "max_batch_size": None, "device": "cpu"})


def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood(lm):
    pairs = [("Question: What is the capital of Lithuania?\nAnswer:", " Vilnius"), ("Labas ", "rytas"),
             ("", "Hello there.")]
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in pairs])
    for p, (ll, greedy) in zip(pairs, got):
        want, want_greedy = hand_loglikelihood(lm.model, lm.tokenizer.sp, *p)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_loglikelihood_rolling_uses_lm_evals_windows(lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = (SHARED_DATA / "text" / "lt_alksnis.txt").read_text().splitlines()[0][:400]
    tokens = lm.tokenizer.encode(text)
    assert len(tokens) > 3 * lm.max_length, "the document must span several windows"
    want = 0.0
    for window in get_rolling_token_windows(tokens, prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length,
                                            context_len=1):
        ctx, cont = make_disjoint_window(window)
        ids = torch.tensor(ctx + cont)
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(ids[None, :-1])[0].double(), dim=-1)
        want += sum(float(lp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    got = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,)), _instance("loglikelihood_rolling",
                                                                                         ("",))])
    assert got[0] == pytest.approx(want, abs=1e-3) and got[1] == 0.0


def test_generate_until_is_greedy_and_stops(lm):
    context = "Question: Kiek bus 2 + 2?\nAnswer:"
    prompt = [lm.prefix_token_id] + lm.tokenizer.encode(context)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(8):  # greedy by full recomputation
            t = int(lm.model(torch.tensor(ids)[None])[0, -1].argmax())
            if t == lm.eot_token_id:
                break
            out.append(t)
            ids.append(t)
    text = lm.tokenizer.decode(out)
    got = lm.generate_until([_instance("generate_until", (context, {"until": [], "max_gen_toks": 8}))])
    assert got == [text]
    if len(text) > 2:
        stop = text[1:3]
        cut = lm.generate_until([_instance("generate_until", (context, {"until": [stop], "max_gen_toks": 8}))])
        assert cut == [text.split(stop)[0]]
    with pytest.raises(ValueError, match="greedily only"):
        lm.generate_until([_instance("generate_until", (context, {"do_sample": True}))])


ARC_TASK_YAML = """task: arc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{prompt}}}}\\nAnswer:"
doc_to_target: "{{{{answer_idx}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_evaluator_through_the_adapter_agrees_with_gemma_ewc_eval(lm, tmp_path, monkeypatch):
    """lm-eval's own evaluator (a local task config, offline) on our model = `gemma-ewc eval` on the same items."""
    import json

    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                       "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}.items():
        monkeypatch.setenv(key, value)  # read when lm-eval first imports datasets, below
    import lm_eval
    from lm_eval.tasks import TaskManager

    from trainer.cli import main

    data = tmp_path / "arc.jsonl"
    data.write_text("".join((SHARED_DATA / "benchmarks" / "arc_easy" / "arc_easy_test.jsonl").read_text()
                            .splitlines(keepends=True)[:8]))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_local.yaml").write_text(ARC_TASK_YAML.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    harness = lm_eval.simple_evaluate(model=lm, tasks=["arc_local"], task_manager=tasks)["results"]["arc_local"]
    ours = tmp_path / "ours.json"
    assert main(["eval", "--model", str(lm.tokenizer.path.parent), "--tasks", f"arc_local={data}",
                 "--max-length", str(lm.max_length), "--out", str(ours)]) == 0
    scores = json.loads(ours.read_text())["tasks"]["arc_local"]["scores"]
    assert harness["acc,none"] == pytest.approx(scores["acc"])
    assert harness["acc_norm,none"] == pytest.approx(scores["acc_norm"])
