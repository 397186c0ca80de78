"""The legacy import's refusals say what they found and give only safe advice."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from trainer.errors import UserError
from trainer.ewc import import_legacy


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_refused_torch_save_file_gets_no_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fisher": _Evil(tmp_path / "pwned")}, path)
    with pytest.raises(UserError) as caught:
        import_legacy(path, tmp_path / "out.safetensors")
    message = str(caught.value)
    assert "refused to load" in message and "system" in message  # names what it rejected
    assert "weights_only=False" not in message and "Re-running" not in message and "\n" not in message
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("value, found", [(float("inf"), "1 infinite"), (float("-inf"), "1 infinite"),
                                          (float("nan"), "1 NaN")])
def test_a_non_finite_legacy_fisher_is_named_for_what_it_holds(tmp_path, value, found):
    fisher = torch.rand(3, 4).half()
    fisher[1, 2] = value
    path = tmp_path / "EWC_params.pkl"
    with open(path, "wb") as fh:
        pickle.dump(([("model.norm.weight", torch.zeros(3, 4).half())], {"model.norm.weight": fisher}), fh)
    with pytest.raises(UserError, match=rf"fisher model.norm.weight holds {found} value\(s\)") as caught:
        import_legacy(path, tmp_path / "out.safetensors")
    assert "NaN in the original" not in str(caught.value)
