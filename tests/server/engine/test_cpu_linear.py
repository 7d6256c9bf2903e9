"""server/engine/models/cpu_linear.py: each packed product is F.linear's (MKL's
at its row count bit for bit, oneDNN's up to the order of its sums), and each
is used only at the row counts where it was measured to help."""

import pytest
import torch
from torch.nn import functional as F

from server.engine.models.cpu_linear import MIN_ROWS, MKL_ROWS, Linear


@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, MKL_ROWS - 1, MKL_ROWS, MKL_ROWS + 1])
@pytest.mark.parametrize("dnn", [False, True])
def test_the_packed_product_is_f_linear_up_to_rounding(rows, dnn):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 1, 64, generator=g)
    for b in (None, bias):
        got, want = Linear(weight, b, dnn=dnn)(x), F.linear(x, weight, b)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 sums in another order


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no MKL")
def test_mkls_packed_product_at_its_row_count_is_f_linear_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(3072, 576, generator=g), torch.randn(3072, generator=g)
    x = torch.randn(MKL_ROWS, 1, 576, generator=g)
    linear = Linear(weight, bias, dnn=True)  # MKL's copy wins over oneDNN's at MKL_ROWS rows
    assert torch.equal(linear(x), F.linear(x, weight, bias))


def test_packed_copies_exist_only_for_float32_cpu_weights_when_asked():
    weight = torch.randn(8, 4)
    plain = Linear(weight)
    assert (plain.mkl is not None) == torch.backends.mkl.is_available()
    assert plain.dnn is None  # oneDNN's copy only where asked for
    assert (Linear(weight, dnn=True).dnn is not None) == torch.backends.mkldnn.is_available()
    # no decode step of an engine with fewer rows can use MKL's copy: none is made
    assert Linear(weight, dnn=True, max_rows=MKL_ROWS - 1).mkl is None
    for other in (Linear(weight, packed=False, dnn=True), Linear(weight.to(torch.bfloat16), dnn=True),
                  Linear(weight.double(), dnn=True)):  # fmt: skip
        assert other.mkl is None and other.dnn is None


def test_the_server_packs_weights_with_the_schedulers_thread_count(tiny_model_dirs, monkeypatch):
    """MKL packs a weight for the thread count of the thread that packs it: a
    copy packed on a one-thread thread, then used by a two-thread scheduler,
    took twice as long per product (measured: 1542 against 899 us)."""
    from ptcore.model import load_model
    from server import build
    from server.engine import backends
    from server.engine.stats import BatchStats
    from server.settings import Settings

    loaded = load_model(str(tiny_model_dirs["llama"]), device="cpu", dtype="float32")
    seen, real = [], backends.slot_model_for

    def spy(*args, **kwargs):  # where the layers' weights are packed
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(backends, "slot_model_for", spy)
    scheduler = build.make_scheduler(Settings(model="m", cpu_threads=3), loaded, BatchStats())
    assert seen == [3]
    assert scheduler.threads == 3
    assert (scheduler.batch.backend.lm_head.mkl is not None) == torch.backends.mkl.is_available()
