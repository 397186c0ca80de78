"""The EWC file: round trip, validation errors, atomic writes, normalisation, online-EWC merge, legacy import."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers import random_model, small_config
from trainer.errors import UserError
from trainer.ewc import (FORMAT, anchor_sha256, import_legacy, load_ewc, merge_ewc, normalize_fisher_, read_header,
                         write_ewc)
from trainer.ewc.file import fisher_divisor
from trainer.hf import named_hf_parameters, to_hf_name


def tiny(seed=0, **overrides):
    return random_model(small_config(num_layers=1, vocab_size=37, **overrides), dtype=torch.float32, seed=seed)


def random_fisher(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {to_hf_name(n): torch.rand(p.shape, generator=g) ** 3 for n, p in model.named_parameters()}


def anchors_of(model):
    return {to_hf_name(n): p.detach() for n, p in model.named_parameters()}


META = {"estimator": "empirical", "samples": 12, "batch_size": 4, "data": "test data", "data_sha256": "ab" * 32}


def write(path, model, fisher=None, **kw):
    return write_ewc(path, fisher=fisher if fisher is not None else random_fisher(model),
                     anchor=anchors_of(model), metadata=META, **kw)


def test_round_trip_metadata_and_plain_safetensors_compatibility(tmp_path):
    model = tiny().to(torch.bfloat16).float()  # bf16-representable weights: the bf16 anchor is lossless
    fisher = random_fisher(model)
    meta = write(tmp_path / "e.safetensors", model, fisher)
    with safe_open(tmp_path / "e.safetensors", framework="pt") as f:  # the reference reader accepts our writer
        on_disk = f.metadata()
        assert set(f.keys()) == {p + n for n in fisher for p in ("fisher.", "anchor.")}
        torch.testing.assert_close(f.get_tensor("fisher.model.norm.weight"), fisher["model.norm.weight"])
    assert on_disk == meta
    assert on_disk["format"] == FORMAT and on_disk["estimator"] == "empirical" and on_disk["samples"] == "12"
    assert (on_disk["fisher_dtype"], on_disk["anchor_dtype"]) == ("float32", "bfloat16")
    assert on_disk["anchor_sha256"] == anchor_sha256((n, t.to(torch.bfloat16)) for n, t in anchors_of(model).items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anchor equals the weights: no warning
        state = load_ewc(tmp_path / "e.safetensors", model, strict=True)
    assert state.max_anchor_diff == 0.0
    assert len(state) == len(list(model.parameters())) and all(p in state for p in model.parameters())
    for n, p in named_hf_parameters(model):  # keyed by the model's own parameters
        f, a = state[p]
        torch.testing.assert_close(f, fisher[n], rtol=0, atol=0)
        assert torch.equal(a.float(), p.detach())
    alone = load_ewc(tmp_path / "e.safetensors", fisher_dtype=torch.bfloat16)
    assert alone.fisher["model.norm.weight"].dtype == torch.bfloat16 and alone.metadata == on_disk


def test_anchor_of_another_model_warns_with_largest_difference_and_strict_refuses(tmp_path):
    model = tiny()
    write(tmp_path / "e.safetensors", model, anchor_dtype=torch.float32)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[3, 5] += 0.5
        model.norm.weight[0] += 0.01
    with pytest.warns(UserWarning, match=r"largest difference 0\.5 in model\.layers\.0\.mlp\.up_proj\.weight "
                                         r"\(2 of \d+ parameters differ\)"):
        state = load_ewc(tmp_path / "e.safetensors", model)
    assert state.max_anchor_diff_param == "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(UserError, match="anchor differs from the model"):
        load_ewc(tmp_path / "e.safetensors", model, strict=True)


def test_truncated_wrong_shape_and_missing_parameter_are_clear_errors(tmp_path):
    model = tiny()
    path = tmp_path / "e.safetensors"
    write(path, model)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="truncated or not a safetensors file"):
        load_ewc(tmp_path / "cut.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(UserError, match="truncated or not a safetensors file"):
        read_header(tmp_path / "junk.safetensors")
    other = tiny(intermediate_size=100)
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight has shape \(\d+, \d+\) in the EWC file but "
                                        r"\(\d+, \d+\) in the model.*another model"):
        load_ewc(path, other)
    deeper = random_model(small_config(num_layers=2, vocab_size=37), seed=0)
    with pytest.raises(UserError, match=r"parameter\(s\) missing from the file \(e\.g\. \['model\.layers\.1\."):
        load_ewc(path, deeper)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="not an EWC file of gemma-ewc.*import-legacy"):
        load_ewc(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("bad, message", [(float("nan"), "non-finite"), (-1e-3, "negative")])
def test_nan_or_negative_fisher_entry_is_refused(tmp_path, bad, message):
    model = tiny()
    fisher = random_fisher(model)
    with pytest.raises(ValueError, match=f"refusing to write an invalid Fisher: .*{message}"):
        write(tmp_path / "never.safetensors", model, fisher={**fisher, "model.norm.weight": torch.full((64,), bad)})
    assert not (tmp_path / "never.safetensors").exists()
    # A file damaged by someone else's tool: same layout, one bad entry.
    tensors = {"fisher." + n: t.clone() for n, t in fisher.items()} | {"anchor." + n: t.clone()
                                                                      for n, t in anchors_of(model).items()}
    tensors["fisher.model.layers.0.mlp.down_proj.weight"][1, 2] = bad
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": FORMAT})
    with pytest.raises(UserError, match=rf"fisher\.model\.layers\.0\.mlp\.down_proj\.weight has 1 {message}"):
        load_ewc(tmp_path / "bad.safetensors", model)


def test_interrupted_write_leaves_no_partial_file(tmp_path):
    model = tiny()
    path = tmp_path / "e.safetensors"
    write(path, model)
    before = path.read_bytes()

    class Interrupting(dict):
        def __getitem__(self, key):
            if key == "model.layers.0.mlp.up_proj.weight":
                raise KeyboardInterrupt  # as Ctrl-C in the middle of the tensors
            return super().__getitem__(key)

    with pytest.raises(KeyboardInterrupt):
        write(path, model, fisher=Interrupting(random_fisher(model, seed=1)))
    assert path.read_bytes() == before  # the previous file is untouched
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "new.safetensors", model, fisher=Interrupting(random_fisher(model, seed=1)))
    assert sorted(os.listdir(tmp_path)) == ["e.safetensors"]  # no partial file, no temporary left behind


def test_normalisation_mean_and_max(tmp_path):
    model = tiny()
    fisher = random_fisher(model)
    flat = torch.cat([t.reshape(-1) for t in fisher.values()]).double()
    assert fisher_divisor(fisher, "none") == 1.0
    assert fisher_divisor(fisher, "mean") == pytest.approx(flat.mean().item(), rel=1e-12)
    for mode, expected in (("mean", flat.mean()), ("max", flat.max())):
        f = {n: t.clone() for n, t in fisher.items()}
        assert normalize_fisher_(f, mode) == pytest.approx(expected.item(), rel=1e-12)
        flat_n = torch.cat([t.reshape(-1) for t in f.values()]).double()
        assert (flat_n.mean() if mode == "mean" else flat_n.max()).item() == pytest.approx(1.0, rel=1e-6)
    write(tmp_path / "e.safetensors", model, fisher)
    state = load_ewc(tmp_path / "e.safetensors", normalize="max")
    assert state.normalize_divisor == pytest.approx(flat.max().item(), rel=1e-6)
    with pytest.raises(UserError, match="all-zero"):
        fisher_divisor({n: torch.zeros_like(t) for n, t in fisher.items()}, "mean")


def test_merge_is_online_ewc(tmp_path):
    old, new = tiny(seed=1), tiny(seed=2)
    fa, fb = random_fisher(old, 1), random_fisher(new, 2)
    fa_scaled = {n: t / 4.0 for n, t in fa.items()}  # A was stored normalised by 4: merge undoes that first
    write_ewc(tmp_path / "a.safetensors", fisher=fa_scaled, anchor=anchors_of(old),
              metadata={**META, "fisher_divisor": "4.0", "fisher_normalize": "mean"})
    write_ewc(tmp_path / "b.safetensors", fisher=fb, anchor=anchors_of(new), metadata={**META, "samples": 30},
              anchor_dtype=torch.float32)
    meta = merge_ewc(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors", gamma=0.9)
    state = load_ewc(tmp_path / "c.safetensors", new, strict=True)  # anchor from B
    params = dict(named_hf_parameters(new))
    for n in fa:
        torch.testing.assert_close(state[params[n]][0], 0.9 * fa[n] + fb[n], rtol=1e-6, atol=1e-12)
    assert meta["samples"] == "42" and json.loads(meta["merge"])["gamma"] == 0.9
    assert read_header(tmp_path / "c.safetensors").metadata["anchor_sha256"] == meta["anchor_sha256"]
    merge_ewc(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "d.safetensors", gamma=0.5,
              normalize="max")
    d = load_ewc(tmp_path / "d.safetensors")
    assert max(t.max().item() for t in d.fisher.values()) == pytest.approx(1.0)
    other = tiny(intermediate_size=100)
    write_ewc(tmp_path / "x.safetensors", fisher=random_fisher(other), anchor=anchors_of(other), metadata=META)
    with pytest.raises(UserError, match=r"cannot merge: model\.layers\.0\.mlp\.[\w.]+ has shape"):
        merge_ewc(tmp_path / "a.safetensors", tmp_path / "x.safetensors", tmp_path / "y.safetensors", gamma=1.0)
    deeper = random_model(small_config(num_layers=2, vocab_size=37), seed=0)
    write_ewc(tmp_path / "z.safetensors", fisher=random_fisher(deeper), anchor=anchors_of(deeper), metadata=META)
    with pytest.raises(UserError, match="different parameters"):
        merge_ewc(tmp_path / "a.safetensors", tmp_path / "z.safetensors", tmp_path / "y.safetensors", gamma=1.0)
    with pytest.raises(UserError, match="gamma"):
        merge_ewc(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "y.safetensors", gamma=-1)
    assert not (tmp_path / "y.safetensors").exists()


# ------------------------------------------------------------------------------------------------ legacy import

def reference_pickle(model, *, prefix="model.", cap=100.0):
    """What the reference study saved: pickle.dump((named_parameters as (name, Parameter) list, fisher dict)),
    float16, with some infinities replaced by the cap."""
    half = model.half()
    fisher = {}
    for i, (n, p) in enumerate(half.named_parameters()):
        f = (torch.rand(p.shape) ** 2).half()
        if i % 3 == 0:
            f.view(-1)[: i + 1] = cap  # i + 1 capped infinities in every third parameter
        fisher[prefix + n] = f
    anchors = [(prefix + n, p) for n, p in half.named_parameters()]  # nn.Parameter objects, as the study pickled
    return anchors, fisher


@pytest.mark.parametrize("flavour", ["pickle.dump", "torch.save"])
@pytest.mark.parametrize("prefix", ["model.", ""])
def test_import_legacy_pickle(tmp_path, flavour, prefix):
    model = tiny()
    anchors, fisher = reference_pickle(model, prefix=prefix)
    path = tmp_path / "EWC_params.pkl"
    if flavour == "pickle.dump":
        with open(path, "wb") as fh:
            pickle.dump((anchors, fisher), fh)
    else:
        torch.save((anchors, fisher), path)
    report = import_legacy(path, tmp_path / "ewc.safetensors")
    expected_capped = sum(i + 1 for i in range(0, len(fisher), 3))
    assert report["capped_infinities"] == expected_capped and report["parameters"] == len(fisher)
    assert report["capped_by_parameter"][0]["count"] == max(i + 1 for i in range(0, len(fisher), 3))
    state = load_ewc(tmp_path / "ewc.safetensors", model.float(), strict=True)  # anchor kept exactly (float32)
    params = dict(named_hf_parameters(model))
    for name, f in fisher.items():
        hf = name if name.startswith("model.") else "model." + name
        assert torch.equal(state[params[hf]][0], f.float())  # capped entries kept as they were
    meta = state.metadata
    assert meta["capped_infinities"] == str(expected_capped) and meta["source"] == "import-legacy"


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(([("model.norm.weight", torch.zeros(2))], {"model.norm.weight": Evil()})))
    with pytest.raises(UserError, match=r"refused to load: the pickle references (posix|os|nt)\.system"):
        import_legacy(raw, tmp_path / "out.safetensors")
    zipped = tmp_path / "evil_zip.pkl"
    torch.save({"fisher": Evil()}, zipped)
    with pytest.raises(UserError, match="refused to load"):
        import_legacy(zipped, tmp_path / "out.safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    (tmp_path / "cut.pkl").write_bytes(raw.read_bytes()[:40])
    with pytest.raises(UserError, match="(not a readable pickle|refused)"):
        import_legacy(tmp_path / "cut.pkl", tmp_path / "out.safetensors")
    buf = io.BytesIO()
    pickle.dump({"not": "the layout"}, buf)
    (tmp_path / "odd.pkl").write_bytes(buf.getvalue())
    with pytest.raises(UserError, match=r"expected a pair \(list of \(name, tensor\) anchors"):
        import_legacy(tmp_path / "odd.pkl", tmp_path / "out.safetensors")
