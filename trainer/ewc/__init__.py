"""EWC state: Fisher estimation (one process or FSDP2), the EWC file, validation, online-EWC merge, legacy import.

    from trainer.ewc import estimate_fisher, write_ewc, load_ewc
    fisher = estimate_fisher(model, batches, estimator="empirical")  # {hf_name: float32 tensor}
    state = load_ewc("ewc.safetensors", model)  # validated {parameter: (fisher, anchor)}, sharded like the model
    opt = EWCAdamW(model.parameters(), ewc_lambda=lam, ewc=state)   # trainer.optim; or opt.set_ewc_state(ewc=state)
    load_ewc("ewc.safetensors").fisher                              # without a model: {hf_name: tensor}

Modules: fisher (the estimator), file (format, load/validate, normalisation, merge), legacy (the reference study's
pickle), batches (MMLU prompts and text rows as mini-batches). The `fisher` and `ewc` commands are in
trainer/commands/; the name mapping (Hugging Face names <-> the model's) is trainer.hf's.
"""

from trainer.ewc.file import (FORMAT, EWCHeader, EWCState, anchor_sha256, fisher_divisor, load_ewc, merge_ewc,
                              normalize_fisher_, read_header, write_ewc)
from trainer.ewc.fisher import FisherStats, estimate_fisher, estimate_fisher_with_stats
from trainer.ewc.legacy import import_legacy, load_legacy_pickle
from trainer.hf import hf_param_name

__all__ = [
    "FORMAT", "EWCHeader", "EWCState", "FisherStats", "anchor_sha256", "estimate_fisher",
    "estimate_fisher_with_stats", "fisher_divisor", "hf_param_name", "import_legacy", "load_ewc",
    "load_legacy_pickle", "merge_ewc", "normalize_fisher_", "read_header", "write_ewc",
]
