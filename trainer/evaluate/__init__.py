"""Evaluation: perplexity, bits per byte and benchmark accuracy of a model, offline; reports comparing runs.

    gemma-ewc eval --model DIR --ppl en=en.txt --tasks arc_easy.jsonl mmlu/test --out results.json
    gemma-ewc report base.json ewc-*.json --out report.md --plots plots/

Modules: `scoring` (packed log-likelihood engine, tokenization), `perplexity`, `tasks` (file formats, prompts,
metrics), `generate` (greedy decoding with the KV cache), `runner` (per-task evaluation, fingerprints, results
JSON), `report` (tables and plots), `lm_eval_adapter` (the `gemma-ewc` model for lm-evaluation-harness). The
commands are trainer/commands/eval.py and report.py; the task files' readers are trainer.task_files.
"""
