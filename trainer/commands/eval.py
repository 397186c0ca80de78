"""`gemma-ewc eval --model DIR [--ppl DATA ...] [--tasks TASKFILE ...] [--out results.json]`: perplexity, bits per
byte and benchmark accuracy of a model, offline.

    gemma-ewc eval --model DIR --ppl en=en.txt lt=lt.txt --tasks arc_easy.jsonl mmlu/test --out results.json \\
        --label ewc-1e3 --lambda 1e3

Every input is read before the model is loaded, so a bad file fails in seconds; then each perplexity input and
each task is scored (trainer.evaluate: perplexity, runner) and the results JSON written (runner.write_results).
The context is the sequence length the model was trained at (DIR/gemma-ewc.json, written by `gemma-ewc export`)
unless --max-length says otherwise (runner.evaluation_context); eval prints which one it used.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from trainer.commands.options import ATTENTION_CHOICES, MODEL_DTYPES, add_overwrite
from trainer.dtypes import compute_dtype, dtype_name
from trainer.errors import UserError
from trainer.evaluate import runner
from trainer.evaluate.perplexity import perplexity_of_input, read_perplexity_input
from trainer.evaluate.scoring import ScoringOptions, Tokenizer, check_tokenizer, default_device
from trainer.evaluate.tasks import TASK_TYPES, attach_fewshot, load_docs, load_task, split_named
from trainer.fileio import check_output
from trainer.hf import load_pretrained
from trainer.task_files import benchmark_files


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face Gemma2 directory (with tokenizer.model)")
    p.add_argument("--ppl", nargs="+", action="extend", default=[], metavar="[NAME=]PATH",
                   help="corpora for perplexity and bits per byte: a .jsonl/.json/.parquet/.txt file (.gz too; "
                        "text: documents separated by blank lines), a folder of them, or a token store made "
                        "with the model's tokenizer")
    p.add_argument("--text-field", default="text", help="text field of JSON Lines and Parquet corpora")
    p.add_argument("--tasks", nargs="+", action="extend", default=[], metavar="[NAME=]PATH",
                   help="benchmark file(s) or folder(s) (.jsonl/.json/.csv/.parquet; MMLU: a folder of subjects)")
    p.add_argument("--task-type", choices=sorted(TASK_TYPES), default=None,
                   help="task type of every --tasks file (default: detected from the fields)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples per item (default: 5 for gsm8k, 0 otherwise)")
    p.add_argument("--fewshot-file", action="append", default=[], metavar="[NAME=]PATH",
                   help="few-shot examples for the task NAME, or for every task of the file's type (default: the "
                        "dev/train file next to the test file, e.g. mmlu/dev/x_dev.csv for mmlu/test/x_test.csv)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the results JSON here (atomically)")
    add_overwrite(p)
    p.add_argument("--label", default=None, help="run label in the results (default: from DIR/gemma-ewc.json, "
                                                 "else the directory name)")
    p.add_argument("--lambda", dest="ewc_lambda", type=float, default=None,
                   help="the run's EWC lambda, recorded for the report (default: from DIR/gemma-ewc.json; omit "
                        "for the pretrained base model)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: DIR/tokenizer.model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", *MODEL_DTYPES), default="auto",
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                   help="attention backend (default: flash or flex on CUDA, eager on CPU)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context window in tokens (default: the sequence length the model was trained at, from "
                        "DIR/gemma-ewc.json; without it the model's max_position_embeddings)")
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window stride for documents longer than the context (default: max-length / 2)")
    p.add_argument("--row-tokens", type=int, default=None,
                   help="tokens per packed row (default: 4096 on CUDA; 128 on CPU, where eager attention costs "
                        "the square of the row length)")
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per forward pass")
    p.add_argument("--gen-batch-size", type=int, default=16, help="prompts decoded together (GSM8K)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation limit per prompt (GSM8K)")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N items of each task file (and N documents of each --ppl file)")
    p.add_argument("--full-hash", action="store_true", help="hash every byte of the weights (default: sampled)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"--{name} must be at least 1, got {value}")


def run(args: argparse.Namespace) -> int:
    if not args.ppl and not args.tasks:
        raise UserError("nothing to evaluate: give --ppl FILE... and/or --tasks FILE...")
    for name in ("max_length", "stride", "row_tokens", "batch_size", "gen_batch_size", "max_new_tokens", "limit"):
        _positive(name.replace("_", "-"), getattr(args, name))
    model_dir = Path(args.model)
    if args.out:
        inputs = [model_dir, args.tokenizer, *(split_named(spec)[1] for spec in args.ppl + args.tasks
                                               + args.fewshot_file)]
        check_output(args.out, inputs=inputs, overwrite=args.overwrite)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} not found: give a Hugging Face Gemma2 directory "
                        f"(config.json, safetensors, tokenizer.model)")
    device = torch.device(args.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    dtype = compute_dtype(args.dtype, device)
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    # Read every input before loading the model, so a bad file fails in seconds, not after minutes of loading.
    tokenizer = Tokenizer(args.tokenizer or model_dir / "tokenizer.model")
    ppl_inputs = []
    for spec in args.ppl:
        name, path = split_named(spec)
        path = Path(path)
        if not path.exists():
            raise UserError(f"perplexity input {path} not found")
        data = read_perplexity_input(path, tokenizer, text_field=args.text_field, limit=args.limit)
        ppl_inputs.append((name or path.name.split(".")[0], path, data))
    named_shots, typed_shots = {}, []
    for spec in args.fewshot_file:
        name, path = split_named(spec)
        if name:
            named_shots[name] = path
        else:
            kind, _, _ = load_docs(benchmark_files(Path(path)), task_type=args.task_type, path=Path(path), limit=1)
            typed_shots.append((kind.name, path))
    tasks = []
    for spec in args.tasks:
        task = load_task(spec, task_type=args.task_type, limit=args.limit)
        shots = named_shots.pop(task.name, None)
        if shots is None:
            shots = next((p for kind, p in typed_shots if kind == task.type.name), None)
        tasks.append(attach_fewshot(task, fewshot=shots, num_fewshot=args.num_fewshot))
    if named_shots:
        raise UserError(f"--fewshot-file names task(s) {sorted(named_shots)} that are not among --tasks "
                        f"({[t.name for t in tasks]})")
    names = [n for n, _, _ in ppl_inputs] + [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two inputs are named {dupes[0]!r}: name them apart with NAME=PATH")

    meta = runner.read_model_metadata(model_dir)
    model = load_pretrained(model_dir, dtype=dtype, device=device, attention_backend=args.attention).eval()
    config = model.config
    check_tokenizer(tokenizer, config)
    context = runner.evaluation_context(requested=args.max_length, metadata=meta,
                                        model_context=config.max_position_embeddings,
                                        metadata_path=model_dir / runner.METADATA_FILE)
    if context.warning:
        print(f"gemma-ewc eval: warning: {context.warning}", file=sys.stderr)
    print(f"gemma-ewc eval: {context.description}", file=sys.stderr)
    max_length = context.max_length
    if any(t.type.generation for t in tasks) and args.max_new_tokens >= max_length:
        raise UserError(f"--max-new-tokens ({args.max_new_tokens}) must be below the {context.description}: lower "
                        f"--max-new-tokens or give --max-length")
    stride = args.stride or max(max_length // 2, 1)
    if stride > max_length:
        raise UserError(f"--stride ({stride}) cannot exceed --max-length ({max_length})")
    cuda = device.type == "cuda"
    options = ScoringOptions(row_tokens=args.row_tokens or (4096 if cuda else 128),
                             batch_rows=args.batch_size, fixed_shape=cuda, progress=progress)
    label = args.label or meta.get("label") or model_dir.resolve().name
    ewc_lambda = args.ewc_lambda if args.ewc_lambda is not None else meta.get("ewc_lambda", meta.get("lambda"))
    settings = {"device": str(device), "dtype": dtype_name(dtype), "attention": args.attention,
                "max_length": max_length, "context_source": context.source, "stride": stride,
                "row_tokens": options.row_tokens, "batch_rows": options.batch_rows, "fixed_shape": options.fixed_shape,
                "max_new_tokens": args.max_new_tokens, "limit": args.limit}
    results = runner.new_results(model_dir=model_dir, fingerprint=runner.model_fingerprint(model_dir,
                                                                                          full=args.full_hash),
                                 tokenizer=tokenizer, config=config, label=label, ewc_lambda=ewc_lambda,
                                 settings=settings, run=meta)

    for name, path, data in ppl_inputs:
        if data.replaced_characters:
            print(f"gemma-ewc eval: {name}: {data.replaced_characters} character(s) of invalid UTF-8 in {path} "
                  f"replaced by U+FFFD before scoring", file=sys.stderr)
        res = perplexity_of_input(model, data, max_length=max_length, stride=stride, options=options,
                                  pad_id=tokenizer.pad_id)
        results["perplexity"][name] = {"file": str(path), "kind": data.kind, "sha256": data.sha256,
                                       "replaced_characters": data.replaced_characters, **res.to_dict()}
        print(f"{name}: perplexity {res.perplexity:.4g}, {res.bits_per_byte:.4f} bits/byte "
              f"({res.documents} documents, {res.tokens} tokens, {res.seconds:.1f} s)")
    for task in tasks:
        for note in task.notes:
            print(f"gemma-ewc eval: {task.name}: {note}", file=sys.stderr)
        body = runner.evaluate_task(model, tokenizer, task, max_length=max_length, options=options,
                                    max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size)
        results["tasks"][task.name] = body
        skipped = body["skipped"]
        if skipped["count"]:
            first = skipped["examples"][0]
            print(f"gemma-ewc eval: {task.name}: skipped {skipped['count']} item(s) that cannot be scored, e.g. "
                  f"{first[0]}: {first[1]} (all reasons in the results)", file=sys.stderr)
        primary = body["primary"]
        se = body["stderr"].get(primary)
        se_text = f" ± {se:.4f}" if se is not None and not math.isnan(se) else ""
        print(f"{task.name} ({body['type']}, {body['num_fewshot']}-shot): {primary} {body['scores'][primary]:.4f}"
              f"{se_text} on {body['n']} items ({body['seconds']:.1f} s)")
    if args.out:
        runner.write_results(args.out, results)
        print(f"results written to {args.out}")
    return 0
