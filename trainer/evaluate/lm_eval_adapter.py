"""lm-evaluation-harness model `gemma-ewc`: run lm-eval's task suites (community Lithuanian configs included) on
our checkpoints with our packed scoring engine.

lm-eval is an optional extra (`pip install 'gemma-ewc[eval]'`). Importing this module registers the model when
lm-eval is importable and does nothing otherwise. lm-eval (0.4.x) has no plugin discovery for models, so either
run its command line through this module, which registers the model first and then hands over to `lm-eval`:

    python -m trainer.evaluate.lm_eval_adapter run --model gemma-ewc \\
        --model_args pretrained=/path/to/checkpoint,dtype=bfloat16 --tasks arc_easy,belebele_lit_Latn \\
        --include_path /path/to/lithuanian/task/configs

or use its Python API after `import trainer.evaluate.lm_eval_adapter`
(`lm_eval.simple_evaluate(model="gemma-ewc", model_args="pretrained=DIR", tasks=[...])`).

Model arguments: pretrained (a Hugging Face Gemma2 directory), tokenizer, device, dtype (auto, float32, bfloat16,
float16), attention, max_length, batch_size (packed rows per forward), row_tokens, max_gen_toks, gen_batch_size.

Semantics follow lm-eval's HFLM for Gemma: BOS prepended; `loglikelihood` splits context and continuation as
HFLM does (trailing context whitespace moves to the continuation; the encoded whole is split at the context's
length) and left-truncates to the window; `loglikelihood_rolling` scores every token once with lm-eval's window
rule (stride = max_length: each window after the first starts at the previous one's last token, and the last one
is full-size); `generate_until` is greedy, stops at any `until` string or EOS, and keeps the last
max_length - max_gen_toks prompt tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trainer.dtypes import compute_dtype
from trainer.evaluate.generate import greedy_generate
from trainer.evaluate.runner import METADATA_FILE, evaluation_context, read_model_metadata
from trainer.evaluate.scoring import (ScoringOptions, Tokenizer, check_tokenizer, default_device, loglikelihood,
                                     loglikelihood_rolling)
from trainer.hf import load_pretrained

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # lm-eval is an optional extra
    _LMBase = object
    _register_model = None
    HAVE_LM_EVAL = False

MODEL_NAME = "gemma-ewc"
_INSTALL_HINT = "the lm-eval adapter needs lm-evaluation-harness: pip install 'gemma-ewc[eval]' (or lm-eval)"


class GemmaEWCLM(_LMBase):
    """An lm-eval `LM` over a Hugging Face Gemma2 directory, loaded with trainer.hf and scored with trainer.evaluate."""

    def __init__(self, pretrained: str, *, tokenizer: str | None = None, device: str | None = None,
                 dtype: str = "auto", attention: str = "auto", max_length: int | None = None,
                 batch_size: int | str | None = None, row_tokens: int | None = None, max_gen_toks: int = 256,
                 gen_batch_size: int = 16, max_batch_size: int | None = None, model=None, **unknown) -> None:
        if not HAVE_LM_EVAL:
            raise ImportError(_INSTALL_HINT)
        if unknown:
            raise ValueError(f"unknown gemma-ewc model argument(s) {sorted(unknown)}; known: pretrained, tokenizer, "
                             f"device, dtype, attention, max_length, batch_size, row_tokens, max_gen_toks, "
                             f"gen_batch_size")
        super().__init__()
        device = torch.device(device or default_device())
        if device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's command line asks for "cuda" by default; on a CPU-only machine run there instead.
            sys.stderr.write("gemma-ewc: CUDA is not available, evaluating on the CPU\n")
            device = torch.device("cpu")
        torch_dtype = compute_dtype(str(dtype), device)
        if model is None:
            model = load_pretrained(pretrained, dtype=torch_dtype, device=device, attention_backend=attention)
        self.model = model.eval()
        self.tokenizer = Tokenizer(tokenizer or Path(pretrained) / "tokenizer.model")
        check_tokenizer(self.tokenizer, self.model.config)
        self._device = device
        model_dir = Path(pretrained) if pretrained else None
        context = evaluation_context(
            requested=int(max_length) if max_length else None,
            metadata=read_model_metadata(model_dir) if model_dir is not None else {},
            model_context=self.model.config.max_position_embeddings,
            metadata_path=(model_dir or Path(".")) / METADATA_FILE)
        if context.warning:
            sys.stderr.write(f"gemma-ewc: {context.warning}\n")
        self._max_length = context.max_length
        self._max_gen_toks = int(max_gen_toks)
        self.gen_batch_size = int(gen_batch_size)
        rows = int(batch_size) if str(batch_size or "").isdigit() else 8
        cuda = device.type == "cuda"
        self.options = ScoringOptions(row_tokens=int(row_tokens or (4096 if cuda else 128)), batch_rows=rows,
                                      fixed_shape=cuda)
        self._pretrained = str(pretrained)

    # lm-eval reads these
    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.model.config.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.options.batch_rows

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        results = loglikelihood(self.model, self.tokenizer, pairs, max_length=self.max_length, options=self.options)
        out = []
        for pair, res in zip(pairs, results):
            if res.error is not None:
                raise ValueError(f"cannot score continuation {pair[1][:60]!r}: {res.error}")
            answer = (res.logprob, res.greedy)
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        strings = [r.args[0] for r in requests]
        tokens = self.tokenizer.encode_batch(strings)
        nonempty = [i for i, t in enumerate(tokens) if t]
        scores = loglikelihood_rolling(self.model, [tokens[i] for i in nonempty], max_length=self.max_length,
                                       stride=self.max_length, options=self.options, pad_id=self.tokenizer.pad_id)
        out = [0.0] * len(strings)
        for k, i in enumerate(nonempty):
            out[i] = scores.logprob[k]
        for s, v in zip(strings, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), v)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = []
        for i, r in enumerate(requests):
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 and r.args[1] else {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0.0:
                raise ValueError("the gemma-ewc model decodes greedily only (do_sample=false, temperature=0)")
            key = (tuple(until), max_new)
            groups.setdefault(key, []).append(i)
            settings.append(context)
        out = [""] * len(requests)
        bos = self.model.config.bos_token_id
        for (until, max_new), indices in groups.items():
            prompts = [[bos] + self.tokenizer.encode(settings[i]) for i in indices]
            gens = greedy_generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new,
                                   max_length=self.max_length, stop=until, batch_size=self.gen_batch_size)
            for i, g in zip(indices, gens):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out


if HAVE_LM_EVAL:
    _register_model(MODEL_NAME)(GemmaEWCLM)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the `gemma-ewc` model registered."""
    if not HAVE_LM_EVAL:
        sys.stderr.write(f"error: {_INSTALL_HINT}\n")
        return 2
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
