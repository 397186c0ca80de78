"""The benchmark and profiling commands run on CPU with tiny sizes and write their outputs.

(`bench optimizer`, `bench train` and `bench model` also run in tests/test_gpu_check.py's dry run.)
"""

from __future__ import annotations

import json

import numpy as np
import torch.distributed as dist

from tests.helpers import write_token_store
from trainer.cli import main


def test_bench_data_writes_its_results(tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--workers", "1", "--megabytes", "0.3", "--vocab-size", "400", "--seq-len", "64",
                 "--batch-size", "2", "--load-tokens", "20000", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokenize"]["tokens"] > 0 and result["tokenize"]["ours_tokens_per_s"]["1"] > 0
    assert result["loading"]["ratio_vs_copy"] > 0
    assert "tokenize" in capsys.readouterr().out


def test_profile_writes_a_trace_and_the_kernel_table(tmp_path):
    rng = np.random.default_rng(0)
    store = write_token_store(tmp_path / "store", [rng.integers(3, 128, size=int(n)) for n in
                                                   rng.integers(20, 300, size=30)], vocab_size=128)
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\npreset = "tiny"\nvocab_size = 128\nattention = "eager"\n'
                      f'[data]\nstores = ["{store}"]\nseq_len = 64\nbatch_size = 2\n'
                      f'[optim]\nmax_steps = 10\n[parallel]\ndevice = "cpu"\n')
    try:
        assert main(["profile", str(config), "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "p")]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    trace = json.loads((tmp_path / "p" / "trace.json").read_text())
    assert trace["traceEvents"]
    table = (tmp_path / "p" / "kernels.md").read_text()
    assert "| name | calls |" in table and "fused EWC-AdamW step" in table
    rows = json.loads((tmp_path / "p" / "kernels.json").read_text())
    assert rows["bytes_per_optimizer_step"] > 0 and rows["steps"] == 2
    step_row = next(r for r in rows["rows"] if r["name"].startswith("= fused"))
    assert step_row["GB_per_s"] > 0
    assert not (tmp_path / "p" / "checkpoints").exists()


def test_bench_loss_keeps_an_existing_out_file_without_overwrite(tmp_path, capsys):
    out = tmp_path / "loss.json"
    out.write_text('{"mine": 1}\n')
    args = ["bench", "loss", "--preset", "tiny", "--rows", "16", "--device", "cpu", "--repeat", "1", "--warmup", "1",
            "--out", str(out)]
    assert main(args) == 2
    assert out.read_text() == '{"mine": 1}\n'
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    result = json.loads(out.read_text())
    # no kernel on a plain CPU: the torch composition and the materialised logits, side by side
    assert result["composition_ms"] > 0 and result["materialised_ms"] > 0
    assert result["composition_speedup_vs_materialised"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["loss.json"]  # no temporary left behind
