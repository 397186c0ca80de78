"""bench/gpu_check.sh in its CPU dry-run mode: every part runs and the result files are written."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_gpu_check_dry_run_writes_results(tmp_path):
    proc = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--results-dir",
                           str(tmp_path)], env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "GEMMA_EWC_GIT": "c0ffee1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_file,) = tmp_path.glob("*-dryrun.json")
    (md_file,) = tmp_path.glob("*-dryrun.md")
    payload = json.loads(json_file.read_text())
    assert [p["status"] for p in payload["parts"]] == ["ok"] * len(payload["parts"])
    # the headline (the training step) first, so that a budget running out skips the tests, never the headline
    assert [p["part"] for p in payload["parts"]] == ["train-2b", "optimizer", "model-2b", "loss-2b", "gpu-tests",
                                                     "train-2b-eager"]
    assert payload["git"] == "c0ffee1"  # the commit measured, also where the copy has no .git
    model = next(p for p in payload["parts"] if p["part"] == "model-2b")
    assert model["tokens_per_s"] > 0 and 0 < model["mfu"] < 1
    table = md_file.read_text()
    assert "| model-2b | ok |" in table
    assert proc.stdout.rstrip().splitlines()[-1].startswith("results: ")
    optimizer = next(p for p in payload["parts"] if p["part"] == "optimizer")
    assert optimizer["f32_d_vs_a"] > 0 and optimizer["f32_d_of_copy_bw"] > 0
    loss = next(p for p in payload["parts"] if p["part"] == "loss-2b")
    assert loss["composition_ms"] > 0  # the kernel's row is "unavailable" on a plain CPU
    train = next(p for p in payload["parts"] if p["part"] == "train-2b")
    assert train["ours_ewc_tokens_per_s"] > 0 and train["ours_ewc_speedup_vs_transformers"] > 0
