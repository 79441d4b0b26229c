"""The float64 Gram kernel beyond one row block: K = X Xᵀ built from its upper row blocks and their
transposes (``_symmetric_product``) equals the plain product within the float64 dot-product bound,
and is exactly symmetric, for sample counts that leave a partial last block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from measure.functional.gram import SYMMETRIC_BLOCK_ROWS, linear_gram

U64 = 2.0**-53


@pytest.mark.parametrize("n", [SYMMETRIC_BLOCK_ROWS // 2 + 1, 300, 2 * SYMMETRIC_BLOCK_ROWS + 3, 700])
def test_float64_gram_in_row_blocks_matches_the_plain_product(n):
    rng = np.random.default_rng(n)
    p = 37
    x = rng.standard_normal((n, p)) + 2.0  # an offset, so the entries are not all of one size
    got = linear_gram(torch.from_numpy(x), "float64").numpy()
    assert np.array_equal(got, got.T)  # the lower blocks are the upper ones transposed
    # tolerance: each entry is a float64 dot product of p terms, |ΔKᵢⱼ| ≤ γ_p Σₖ|xᵢₖ xⱼₖ| (Higham §3.1),
    # for this kernel and for numpy's product alike, so the two differ by at most twice that
    gamma = p * U64 / (1 - p * U64)
    bound = 2 * gamma * (np.abs(x) @ np.abs(x).T)
    assert np.all(np.abs(got - x @ x.T) <= bound)
    # the diagonal is the squared row norm, counted once
    np.testing.assert_allclose(np.diag(got), (x * x).sum(axis=1), rtol=4 * gamma, atol=0)
