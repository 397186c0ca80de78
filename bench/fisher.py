"""Fisher pass vs a training step's forward + backward, same model and same batch: tokens/s and their ratio.

    python -m bench.fisher --preset small --seq-len 512 --batch-size 4
    python -m bench.fisher --preset gemma2-2b --seq-len 4096 --device cuda --attention flex   # on a GPU

Anchor: the trainer's forward + backward of one mini-batch (`model(ids, positions, labels=...)`: chunked LM head
+ cross entropy, mean over scored tokens, backward, gradients dropped; no optimizer). Measured: estimate_fisher
over the same mini-batches, which adds per mini-batch one fused max|g| check and one fused g² accumulation
(`_foreach_addcmul_`: read g and the sum, write the sum) on every parameter. Two data shapes:

- text: every position scored (the language-model loss over documents), as in the training step;
- mmlu-like: one scored position per document (the answer letter), the rest unscored: the Fisher sends only the
  scored rows through the LM head, the training step (which does not know) sends all of them.

The goal: a Fisher pass costs no more than 1.15x the time of a training step per token (ratio >= 0.87).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import format_table, machine_info, time_fn, write_results
from bench.model import COMPUTE_DTYPES, packed_batch
from kernels.linear_cross_entropy import IGNORE_INDEX
from trainer.dtypes import compute_dtype
from trainer.ewc import estimate_fisher
from trainer.model import Gemma2, Gemma2Config


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model preset (tiny, small, gemma2-2b, ...)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="rows per mini-batch")
    p.add_argument("--mean-doc-len", type=int, default=200, help="mean length of the packed documents")
    p.add_argument("--batches", type=int, default=3, help="mini-batches per timed call")
    p.add_argument("--repeat", type=int, default=5, help="interleaved timed rounds (after one warm-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help="compute dtype (parameters stay float32); default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention", default="auto", help="attention backend: auto, eager, flex, flash")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="wall time, or process CPU time (default: wall on CUDA, cpu on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; cpu clock: 1)")
    p.add_argument("--out", default=None, help="write the results JSON here")


def measure(fn, *, device, clock: str) -> float:
    """Seconds of one call: wall time (device-synchronised), or this process's CPU time (immune to other
    processes on a shared CPU machine; with one thread it is the compute cost itself)."""
    if clock == "wall":
        return time_fn(fn, device=device, warmup=0, repeat=1)["min_s"]
    start = time.process_time()
    fn()
    return time.process_time() - start


def make_batch(config: Gemma2Config, args, *, device, mmlu_like: bool) -> dict[str, torch.Tensor]:
    ids, pos, _ = packed_batch(args.batch_size, args.seq_len, config.vocab_size, args.mean_doc_len, device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    nxt = torch.cat([pos[:, 1:], torch.zeros_like(pos[:, :1])], dim=1)
    same_doc = nxt != 0  # the next token belongs to the same document
    labels[:, :-1] = torch.where(same_doc[:, :-1], ids[:, 1:], IGNORE_INDEX)
    if mmlu_like:  # keep only the last scored position of each document
        last = same_doc & ~torch.cat([same_doc[:, 1:], torch.zeros_like(same_doc[:, :1])], dim=1)
        labels = torch.where(last, labels, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    compute = compute_dtype(args.dtype, device)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if args.threads or clock == "cpu":
        torch.set_num_threads(args.threads or 1)
    config = Gemma2Config.preset(args.preset)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Gemma2(config, attention_backend=args.attention)
    model = model.to_empty(device=device)
    model.init_weights(std=0.02)
    autocast = torch.autocast(device.type, dtype=compute, enabled=compute != torch.float32)
    rows = []
    for shape in ("text", "mmlu-like"):
        batch = make_batch(config, args, device=device, mmlu_like=shape == "mmlu-like")
        n_scored = int((batch["labels"] != IGNORE_INDEX).sum())
        tokens = batch["input_ids"].numel() * args.batches

        def train_steps():
            for _ in range(args.batches):
                with autocast:
                    loss = model(batch["input_ids"], batch["position_ids"], labels=batch["labels"]) / n_scored
                loss.backward()
                model.zero_grad(set_to_none=True)

        def fisher_pass():
            estimate_fisher(model, [batch] * args.batches, compute_dtype=compute)

        # Interleaved rounds, fastest of each: a busy shared machine slows whichever runs at the wrong moment.
        t_train, t_fisher = float("inf"), float("inf")
        train_steps(), fisher_pass()  # warm-up
        for _ in range(args.repeat):
            t_train = min(t_train, measure(train_steps, device=device, clock=clock))
            t_fisher = min(t_fisher, measure(fisher_pass, device=device, clock=clock))
        rows.append({"data": shape, "scored_per_row": n_scored / args.batch_size,
                     "train_tok_s": tokens / t_train, "fisher_tok_s": tokens / t_fisher,
                     "fisher_cost_x": t_fisher / t_train})
    result = {"benchmark": "fisher", "device": str(device), "preset": args.preset, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "batches": args.batches, "compute_dtype": str(compute),
              "attention": args.attention, "clock": clock, "threads": torch.get_num_threads(), "rows": rows,
              "machine": machine_info(device)}
    print(format_table(rows, ["data", "scored_per_row", "train_tok_s", "fisher_tok_s", "fisher_cost_x"]))
    print(f"fisher_cost_x = Fisher time / training forward+backward time for the same tokens (goal <= 1.15); "
          f"{clock} clock, {torch.get_num_threads()} thread(s)")
    if args.out:
        write_results(args.out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configure(p)
    result = run(p.parse_args(argv))
    return 0 if result else 1


if __name__ == "__main__":
    raise SystemExit(main())
