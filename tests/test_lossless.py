"""Lossless: every MoP layout trains exactly like one process (fp32, CPU, gloo)."""

import pytest

from tests.lossless import compare_with_reference


@pytest.mark.parametrize("world", [2, 4])
def test_dense_path_sharded_equals_single_process(world, tmp_path):
    compare_with_reference(world, {}, tmp_path)
