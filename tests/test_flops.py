"""FLOP counts: attention keys counted exactly as the masks admit them; 6·N for the matrix multiplications."""

import pytest
import torch

from tests.helpers import small_config
from trainer.attention import build_masks
from trainer.flops import keys_attended, matmul_params, training_flops_per_token
from trainer.model import Gemma2


@pytest.mark.parametrize("n,window", [(1, 4), (7, 3), (12, 12), (30, 5), (9, None)])
def test_keys_attended_counts_the_mask(n, window):
    pos = torch.arange(n)[None]
    masks = build_masks(pos, backend="eager", sliding_window=window or 10**9)
    assert keys_attended(n, window) == int((~masks.sliding).sum())


def test_training_flops_follow_the_packed_masks():
    config = small_config(sliding_window=6)
    lengths = [5, 17, 10]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    masks = build_masks(pos, backend="eager", sliding_window=config.sliding_window)
    keys = sum(int((~(masks.sliding if config.is_sliding(i) else masks.full)).sum()) for i in range(config.num_layers))
    seq = sum(lengths)
    expected = 6 * matmul_params(config) + 3 * 4 * config.num_heads * config.head_dim * keys / seq
    assert training_flops_per_token(config, seq, doc_lengths=lengths) == pytest.approx(expected)
    with pytest.raises(ValueError, match="sum to"):
        training_flops_per_token(config, seq + 1, doc_lengths=lengths)


def test_matmul_params_exclude_norms_only():
    config = small_config()
    model = Gemma2(config)
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    assert matmul_params(config) == sum(p.numel() for p in model.parameters()) - norms


def test_batch_flops_match_per_row_document_counts():
    from trainer.flops import batch_flops_per_token

    config = small_config(sliding_window=4)
    pos = torch.stack([torch.cat([torch.arange(3, 9), torch.arange(10)]), torch.cat([torch.arange(7), torch.arange(9)])])
    per_row = [training_flops_per_token(config, 16, doc_lengths=d) for d in ([6, 10], [7, 9])]
    assert batch_flops_per_token(config, pos) == pytest.approx(sum(per_row) / 2)
