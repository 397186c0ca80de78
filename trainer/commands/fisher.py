"""`gemma-ewc fisher --model DIR --data PATH --format {mmlu,text} --out EWC.safetensors`: estimate the diagonal
Fisher of a model and write an EWC file (Fisher and anchor, trainer.ewc).

One code path for one process and for many under torchrun, as training: a process group always
(trainer.distributed), the model sharded with FSDP2 over every rank (trainer.parallelize; float32 master weights,
bfloat16 or float32 compute, float32 gradient reduction), each rank reading only its rows of the checkpoint,
computing on its part of every global mini-batch and accumulating only its own Fisher shard; rank 0 writes the
file, gathering one tensor at a time.

On CUDA the batches have fixed shapes (trainer.ewc.batches: at most 4 [rows, width] planned for the run's prompts,
one for text rows), as evaluation's scoring does: FlexAttention is compiled per shape. Padding changes no Fisher
value; it costs FLOPs, which the closing line reports as the share of computed positions that were padding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from trainer.commands.options import ATTENTION_CHOICES, STATE_DTYPES, add_overwrite, default_first
from trainer.config import ParallelConfig
from trainer.data.tokenize import read_sentencepiece
from trainer.distributed import init_distributed, process_group_scope
from trainer.dtypes import DTYPES, compute_dtype, dtype_name
from trainer.errors import UserError
from trainer.ewc.batches import encode_mmlu, prompt_batches, row_batches, text_rows
from trainer.ewc.file import NORMALIZE_MODES, normalize_fisher_, write_ewc
from trainer.ewc.fisher import ESTIMATORS, estimate_fisher_with_stats, named_hf_parameters
from trainer.fileio import check_output, files_sha256, sha256_file
from trainer.hf import HFCheckpoint
from trainer.parallelize import build_mesh, build_sharded_model
from trainer.prompts import DEFAULT_MMLU_TEMPLATE, load_template
from trainer.task_files import mmlu_files, read_mmlu


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face Gemma2 directory (config.json, safetensors)")
    p.add_argument("--data", required=True,
                   help="MMLU file or directory (CSV / Parquet / JSON); text: corpus file or directory (JSON Lines, "
                        "Parquet, plain text with documents between blank lines)")
    p.add_argument("--format", required=True, choices=("mmlu", "text"),
                   help="mmlu: cross entropy of the answer letter; text: language-model loss over documents")
    p.add_argument("--out", required=True, help="EWC file to write (safetensors)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="empirical",
                   help="empirical: the data's labels; sampled: labels drawn from the model (default: empirical)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="samples per mini-batch (prompts or text rows); 1 = per-sample Fisher (default: 4)")
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples (quick estimate)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="text: row length (default 2048); mmlu: skip prompts longer than this (default: none)")
    p.add_argument("--fisher-dtype", choices=STATE_DTYPES, default="float32")
    p.add_argument("--anchor-dtype", choices=default_first(STATE_DTYPES, "bfloat16"), default="bfloat16",
                   help="anchor precision (bfloat16 is lossless for a bfloat16 checkpoint)")
    p.add_argument("--normalize", choices=NORMALIZE_MODES, default="none",
                   help="divide the Fisher by its global mean or max (the divisor is recorded)")
    p.add_argument("--seed", type=int, default=0, help="order of MMLU items and the sampled labels")
    p.add_argument("--dtype", choices=STATE_DTYPES, default=None,
                   help="compute dtype (gradients and sums stay float32); default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when available (under torchrun: this rank's GPU)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                   help=f"attention backend: {', '.join(ATTENTION_CHOICES)}")
    p.add_argument("--prompt-template", default=None,
                   help="MMLU prompt template file with {subject} {examples} {question} {options} {answer}")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: MODEL/tokenizer.model)")
    p.add_argument("--text-field", default="text", help="text: the field of JSON Lines / Parquet records")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite(p)


def load_sharded(path, *, device: torch.device, compute_dtype: str, attention_backend: str):
    """A Hugging Face Gemma2 directory into an FSDP2 model over every rank (trainer.parallelize), each rank
    reading only its rows; float32 master weights, `compute_dtype` matmuls, float32 gradient reduction."""
    config = ParallelConfig(param_dtype=compute_dtype, reduce_dtype="float32", device=device.type)
    return build_sharded_model(HFCheckpoint(path).config, config, mesh=build_mesh(config, device_type=device.type),
                               device=device, pretrained=path, attention_backend=attention_backend)


def fixed_batch_shapes(device: torch.device) -> bool:
    """Whether the batches get fixed shapes (trainer.ewc.batches): on CUDA, where the decoder blocks (and
    FlexAttention) are compiled per shape, as evaluation does (commands/eval.py); also with flash-attn, since the
    compiled blocks would recompile. Elsewhere they are packed tight: padding would only cost."""
    return device.type == "cuda"


def run(args: argparse.Namespace) -> int:
    with process_group_scope():
        return _fisher(args)


def _fisher(args: argparse.Namespace) -> int:
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples must be at least 1, got {args.max_samples}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    check_output(args.out, inputs=[args.model, args.data, args.prompt_template, args.tokenizer],
                 overwrite=args.overwrite)
    config = HFCheckpoint(args.model).config  # validates the directory before any heavy work
    # One code path for 1 and N ranks (as training): a process group always, the model always FSDP2-sharded.
    env = init_distributed(args.device)
    rank, world, device = env.rank, env.world_size, env.device
    compute = compute_dtype(args.dtype, device)
    compute_name = dtype_name(compute)
    fixed_shapes = fixed_batch_shapes(device)
    tokenizer = Path(args.tokenizer) if args.tokenizer else Path(args.model) / "tokenizer.model"
    data = Path(args.data)
    meta: dict[str, object] = {}
    if args.format == "mmlu":
        template = load_template(args.prompt_template) if args.prompt_template else DEFAULT_MMLU_TEMPLATE
        sp, _ = read_sentencepiece(tokenizer)
        items = read_mmlu(data)
        order = np.random.default_rng(args.seed).permutation(len(items))
        items = [items[i] for i in order]
        bos = sp.bos_id() if sp.bos_id() >= 0 else config.bos_token_id
        prompts, skipped_long = [], 0
        for item in items:  # encode lazily: --max-samples stops early
            (encoded,) = encode_mmlu([item], sp, bos_id=bos, template=template)
            if args.seq_len is not None and len(encoded.ids) > args.seq_len:
                skipped_long += 1
                continue
            prompts.append(encoded)
            if args.max_samples is not None and len(prompts) == args.max_samples:
                break
        if not prompts:
            raise UserError(f"{data}: no prompt left to score" + (f" (all longer than --seq-len {args.seq_len})"
                                                                  if skipped_long else ""))
        top = max(max(p.ids) for p in prompts)
        n_samples = len(prompts)
        batches = prompt_batches(prompts, batch_size=args.batch_size, pad_id=config.pad_token_id, rank=rank,
                                 world_size=world, fixed_shapes=fixed_shapes)
        files = mmlu_files(data)
        meta.update(prompt_template=template, skipped_long_prompts=skipped_long,
                    data=f"mmlu: {data} ({n_samples} of {len(items)} items, shuffled with seed {args.seed}; "
                         f"loss: cross entropy of the answer letter)")
    else:
        seq_len = args.seq_len or 2048
        rows, files = text_rows(data, tokenizer=tokenizer, seq_len=seq_len, text_field=args.text_field,
                                pad_id=config.pad_token_id, max_rows=args.max_samples)
        top = int(rows["input_ids"].max())
        n_samples = len(rows["input_ids"])
        batches = row_batches(rows, batch_size=args.batch_size, pad_id=config.pad_token_id, rank=rank,
                              world_size=world, fixed_shapes=fixed_shapes)
        meta.update(seq_len=seq_len, data=f"text: {data} ({n_samples} rows of {seq_len} tokens; loss: next token)")
    if top >= config.vocab_size:
        raise UserError(f"{tokenizer} produced token id {top}, but the model's vocabulary has {config.vocab_size} "
                        f"entries: the tokenizer does not belong to this model")

    model = load_sharded(args.model, device=device, compute_dtype=compute_name, attention_backend=args.attention)
    fisher, stats = estimate_fisher_with_stats(model, batches, estimator=args.estimator, compute_dtype=compute,
                                               seed=args.seed, progress=not args.quiet, total_samples=n_samples)
    divisor = normalize_fisher_(fisher, args.normalize)
    meta.update(estimator=args.estimator, samples=stats.samples, batches=stats.batches, batch_size=args.batch_size,
                scored_tokens=stats.scored_tokens, skipped_batches=stats.skipped_batches,
                data_sha256=files_sha256(files), fisher_normalize=args.normalize, fisher_divisor=repr(divisor),
                compute_dtype=compute_name, seed=args.seed,
                model=str(Path(args.model).resolve()), world_size=world, tokenizer_sha256=sha256_file(tokenizer))
    anchors = dict(named_hf_parameters(model))
    written = write_ewc(args.out, fisher=fisher, anchor=anchors, metadata=meta,
                        fisher_dtype=DTYPES[args.fisher_dtype], anchor_dtype=DTYPES[args.anchor_dtype])
    if rank == 0:
        print(f"wrote {args.out}: Fisher ({args.estimator}) over {stats.samples} samples in {stats.batches} "
              f"mini-batches of {args.batch_size}, {stats.scored_tokens} scored tokens; {stats.tokens} tokens "
              f"({stats.padding:.1%} padding, {len(stats.shapes)} batch shape(s)) in {stats.seconds:.1f} s "
              f"({stats.tokens_per_s:,.0f} tokens/s) on {world} process(es); "
              f"normalize {args.normalize} (divisor {divisor:.4g}); anchor sha256 {written['anchor_sha256'][:16]}")
    return 0
