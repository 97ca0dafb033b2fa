import torch

from ovis2.engine.block_tables import padded_block_tables


def test_rows_are_padded_with_fill_and_extra_rows_are_all_fill():
    out = padded_block_tables([[3, 1], [], [5, 6, 7]], num_rows=4, width=3, fill=9)
    assert out.dtype == torch.int64
    assert out.tolist() == [[3, 1, 9], [9, 9, 9], [5, 6, 7], [9, 9, 9]]
