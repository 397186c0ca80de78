"""The λ study in one command: every combination of a grid of config values is one run of `train` from the same
starting model, then `export`, then `eval`; one `report` over all of them (and the starting model).

    plan = plan_sweep("configs/lt.toml", out="sweeps/lt", grid=["ewc.lambda=0,100,1e4"],
                      eval_args=["--ppl", "en=en_heldout.txt", "lt=lt_heldout.txt"])
    run_sweep(plan)          # or stage_lines(plan) for a cluster scheduler, then collect(out)

A sweep directory:

    sweep.json              what was planned: config (path and sha256), grid, overrides, eval arguments, the runs
    commands.txt            one shell line per run (and one for the base model), as `sweep --print` writes them
    runs/NAME/              each run's directory, exactly what `gemma-ewc train --out runs/NAME` makes
    models/NAME/            its export (Hugging Face directory + gemma-ewc.json)
    results/NAME.json       its eval results; results/base.json: the starting model's
    report.md, *.png        the report over every results file

Resuming is running the same sweep again: a run whose results exist is skipped, a run with a model but no results
is evaluated, and a run interrupted during training resumes from its newest checkpoint (train's own resume). A
sweep directory planned with another config, grid or eval arguments is refused (`--overwrite` starts afresh).
Every stage runs through the real command line (trainer.cli), in this process, and prints the command it runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from trainer import cli
from trainer.config import load_config
from trainer.errors import UserError
from trainer.evaluate.tasks import split_named
from trainer.fileio import atomic_path, check_output, sha256_file

FORMAT = "gemma-ewc/sweep-v1"
MANIFEST = "sweep.json"
COMMANDS_FILE = "commands.txt"
BASE = "base"


@dataclass(frozen=True)
class SweepRun:
    """One combination of the grid: its name (also its run directory's and its results' label) and overrides."""

    name: str
    overrides: tuple[str, ...]

    @property
    def run_dir(self) -> str:
        return f"runs/{self.name}"

    @property
    def model_dir(self) -> str:
        return f"models/{self.name}"

    @property
    def results(self) -> str:
        return f"results/{self.name}.json"


@dataclass
class SweepPlan:
    out: Path
    config: Path
    config_sha256: str
    grid: list[tuple[str, list[str]]]
    overrides: list[str]  # --set values applied to every run
    eval_args: list[str]
    runs: list[SweepRun]
    base_model: str | None  # the starting model (model.pretrained), evaluated as "base"
    seq_len: int  # the shortest context a run trains at: the base model is scored at it too, for a fair comparison
    report_args: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # what the runs read: the sweep never writes over them

    def manifest(self) -> dict:
        """sweep.json's content, as JSON reads it back (lists, not tuples: a resumed sweep compares equal)."""
        return json.loads(json.dumps(self._manifest()))

    def _manifest(self) -> dict:
        return {"format": FORMAT, "config": str(self.config), "config_sha256": self.config_sha256,
                "grid": [[k, v] for k, v in self.grid], "overrides": self.overrides, "eval": self.eval_args,
                "base_model": self.base_model, "seq_len": self.seq_len, "report": self.report_args,
                "runs": [{**asdict(r), "run_dir": r.run_dir, "model_dir": r.model_dir, "results": r.results}
                         for r in self.runs]}


# --------------------------------------------------------------------------------------------------- planning


def split_values(text: str) -> list[str]:
    """"0,1,1e3" -> ["0", "1", "1e3"]; commas inside brackets or quotes stay: "[1,0],[0.95,0.05]" -> two lists."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """"KEY=V1,V2,..." -> (KEY, [V1, V2, ...]); each value a TOML literal, as `--set KEY=V` takes it."""
    if "=" not in spec:
        raise UserError(f"--grid expects KEY=V1,V2,... (e.g. ewc.lambda=0,10,100), got {spec!r}")
    key, text = spec.split("=", 1)
    key = key.strip()
    values = split_values(text)
    if not key or any(not v for v in values):
        raise UserError(f"--grid {spec!r}: a key and non-empty comma-separated values are needed")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {spec!r} repeats a value")
    return key, values


def _slug(value: str) -> str:
    """A value as part of a directory name: "[0.95, 0.05]" -> "0.95-0.05"."""
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-")
    return slug or "empty"


def run_name(index: int, assignment: Sequence[tuple[str, str]]) -> str:
    return f"{index:03d}-" + "_".join(f"{key.rsplit('.', 1)[-1]}={_slug(value)}" for key, value in assignment)


def _eval_inputs(eval_args: Sequence[str]) -> list[str]:
    """The paths among eval's arguments (values of --ppl, --tasks, ...), as inputs the sweep must not write over."""
    return [split_named(a)[1] for a in eval_args if not a.startswith("-") and Path(split_named(a)[1]).exists()]


def plan_sweep(config: str | Path, *, out: str | Path, grid: Sequence[str], eval_args: Sequence[str],
               overrides: Sequence[str] = (), report_args: Sequence[str] = ()) -> SweepPlan:
    """Every run's configuration is loaded and validated now, before anything is written."""
    config = Path(config)
    if not config.is_file():
        raise UserError(f"config file {config} not found")
    if not grid:
        raise UserError("give at least one --grid KEY=V1,V2,... (e.g. --grid ewc.lambda=0,10,100)")
    if not any(a in ("--ppl", "--tasks") for a in eval_args):
        raise UserError("give what to evaluate each run on: --eval --ppl NAME=FILE ... [--tasks FILE ...]")
    axes = [parse_grid(spec) for spec in grid]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise UserError(f"--grid names a key twice: {keys}")
    runs, base_model, seq_lens = [], None, []
    inputs = [str(config), *_eval_inputs(eval_args)]
    for index, values in enumerate(itertools.product(*(v for _, v in axes))):
        assignment = list(zip(keys, values))
        run_overrides = tuple(f"{k}={v}" for k, v in assignment)
        try:
            resolved = load_config(config, [*overrides, *run_overrides])
        except UserError as exc:
            raise UserError(f"run {', '.join(run_overrides)}: {exc}") from None
        base_model = resolved.model.pretrained
        seq_lens.append(resolved.data.seq_len)
        inputs += [p for p in (*resolved.data.stores, resolved.data.tokenizer, resolved.ewc.file,
                               resolved.model.pretrained) if p]
        runs.append(SweepRun(run_name(index, assignment), run_overrides))
    return SweepPlan(Path(out), config, sha256_file(config), axes, list(overrides), list(eval_args), runs,
                     base_model, min(seq_lens), list(report_args), inputs)


def prepare_dir(plan: SweepPlan, *, overwrite: bool) -> None:
    """A new sweep directory, or this sweep's own (resumed); another sweep's only with `overwrite` (replaced)."""
    out = check_output(plan.out, inputs=plan.inputs, overwrite=True, directory=True)
    manifest_path = out / MANIFEST
    if out.is_dir() and any(out.iterdir()):
        if not manifest_path.is_file():
            raise UserError(f"--out {out} is a non-empty directory but not a sweep (no {MANIFEST}); choose another "
                            f"--out")
        try:
            previous = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{manifest_path} is damaged ({exc}); pass --overwrite to start the sweep afresh") \
                from None
        if previous != plan.manifest():
            if not overwrite:
                raise UserError(f"--out {out} holds a sweep planned with another config, grid or eval arguments; "
                                f"pass --overwrite to replace it, or choose another --out")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(plan.manifest(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------- stages


def _path(plan: SweepPlan, relative: str) -> str:
    return str(plan.out / relative)


def run_stages(plan: SweepPlan, run: SweepRun) -> list[tuple[str, list[str]]]:
    """(stage, `gemma-ewc` arguments) of one run: train, export, eval."""
    train = ["train", str(plan.config), "--out", _path(plan, run.run_dir)]
    for item in [*plan.overrides, *run.overrides]:
        train += ["--set", item]
    return [("train", train),
            ("export", ["export", _path(plan, run.run_dir), "--out", _path(plan, run.model_dir)]),
            ("eval", ["eval", "--model", _path(plan, run.model_dir), *plan.eval_args, "--out",
                      _path(plan, run.results)])]


def base_stage(plan: SweepPlan) -> list[str] | None:
    if plan.base_model is None:
        return None
    # Each run is scored at the context it trained at (eval's default); the base model at the same one, not at its
    # own (a pretrained model's context is often longer), unless the eval arguments set one for every model.
    context = [] if "--max-length" in plan.eval_args else ["--max-length", str(plan.seq_len)]
    return ["eval", "--model", plan.base_model, *plan.eval_args, *context, "--out",
            _path(plan, f"results/{BASE}.json"), "--label", BASE]


def stage_lines(plan: SweepPlan, *, launcher: str = "gemma-ewc") -> list[str]:
    """One shell line per run (train && export && eval; `launcher` starts train, e.g. torchrun ... -m trainer.cli),
    the base model's eval first; for a scheduler's job array."""
    lines = []
    base = base_stage(plan)
    if base is not None:
        lines.append(shlex.join(["gemma-ewc", *base]))
    for run in plan.runs:
        parts = []
        for stage, argv in run_stages(plan, run):
            prefix = shlex.split(launcher) if stage == "train" else ["gemma-ewc"]
            parts.append(shlex.join([*prefix, *argv]))
        lines.append(" && ".join(parts))
    return lines


def write_commands(plan: SweepPlan, *, launcher: str = "gemma-ewc") -> list[str]:
    lines = stage_lines(plan, launcher=launcher)
    with atomic_path(plan.out / COMMANDS_FILE) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    return lines


def run_stage(argv: Sequence[str]) -> None:
    """One `gemma-ewc` command, in this process, announced as the shell line it is."""
    print("\n$ " + shlex.join(["gemma-ewc", *argv]), flush=True)
    code = cli.main(list(argv))
    if code:
        raise UserError(f"the stage `gemma-ewc {argv[0]}` failed (exit {code}); fix it and run the same command "
                        f"again to resume")


def run_sweep(plan: SweepPlan) -> list[Path]:
    """Run (or resume) every run, then the report; returns the results files."""
    base = base_stage(plan)
    if base is not None and not (plan.out / "results" / f"{BASE}.json").is_file():
        run_stage(base)
    for run in plan.runs:
        if (plan.out / run.results).is_file():
            print(f"\n# {run.name}: done (results/{run.name}.json exists), skipped", flush=True)
            continue
        for stage, argv in run_stages(plan, run):
            if stage in ("train", "export") and (plan.out / run.model_dir / "config.json").is_file():
                continue  # exported already (atomically): the training is complete
            run_stage(argv)
    return collect(plan.out)


def collect(out: str | Path) -> list[Path]:
    """The report over the sweep's results files that exist (`sweep --collect`, or the end of a sweep)."""
    out = Path(out)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{out} is not a sweep directory (no {MANIFEST}); make one with gemma-ewc sweep")
    manifest = json.loads(manifest_path.read_text())
    names = ([BASE] if manifest.get("base_model") else []) + [r["name"] for r in manifest["runs"]]
    found = [out / "results" / f"{n}.json" for n in names if (out / "results" / f"{n}.json").is_file()]
    missing = [n for n in names if not (out / "results" / f"{n}.json").is_file()]
    if missing:
        print(f"# not finished yet, left out of the report: {', '.join(missing)}", file=sys.stderr)
    if not found:
        raise UserError(f"{out}: no run has results yet")
    report = ["report", *map(str, found), "--out", str(out / "report.md"), "--plots", str(out), "--overwrite"]
    if manifest.get("base_model") and (out / "results" / f"{BASE}.json").is_file():
        report += ["--base", BASE]
    run_stage(report + list(manifest.get("report", [])))
    return found


def fingerprint(plan: SweepPlan) -> str:
    """A short hash of what was planned (printed, so two terminals can tell they run the same sweep)."""
    return hashlib.sha256(json.dumps(plan.manifest(), sort_keys=True).encode()).hexdigest()[:12]
