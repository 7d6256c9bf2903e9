"""server/engine/models/cpu_linear.py: the packed product is F.linear's, up to
the order of its sums, and is used only where it was measured to help."""

import pytest
import torch
from torch.nn import functional as F

from server.engine.models.cpu_linear import MIN_ROWS, Linear


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 33])
def test_the_packed_product_is_f_linear_up_to_rounding(rows):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 3, 64, generator=g)
    for b in (None, bias):
        got, want = Linear(weight, b)(x), F.linear(x, weight, b)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 sums in another order


def test_a_packed_copy_exists_only_for_float32_cpu_weights_when_asked():
    weight = torch.randn(8, 4)
    assert (Linear(weight).packed is not None) == torch.backends.mkldnn.is_available()
    assert Linear(weight, packed=False).packed is None
    assert Linear(weight.to(torch.bfloat16)).packed is None
    assert Linear(weight.double()).packed is None
