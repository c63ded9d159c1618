"""fastbn.nn.SyncBatchNorm on CPU tensors: 3 gloo processes (and a group of 2 of them), each
with part of a batch, against one BatchNorm on the whole batch (outputs, input and
parameter gradients, running statistics; float64 to 1e-12), for even and uneven splits,
a rank with no samples, and under DistributedDataParallel; and the single-process API.

One spawn runs every scenario (tests/sync_worker.py): starting processes is the slow part
(a few seconds). The processes meet through a file in a temporary directory, not a port,
so that two test runs cannot collide.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastbn.nn as fnn
import sync_worker
from sync_worker import CHANNELS, SCENARIOS, STEPS, WORLD_SIZE

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    directory = tmp_path_factory.mktemp("sync_batch_norm")
    mp.spawn(sync_worker.run, args=(str(directory / "init"), str(directory)),
             nprocs=WORLD_SIZE, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def reference_steps(name):
    """One BatchNorm (float64) on the whole batch of each step: y, gradients, buffers."""
    sizes, sample, _, _, _, _, momentum = SCENARIOS[name]
    batch_norm = nn.BatchNorm2d if len(sample) == 2 else nn.BatchNorm1d
    module = sync_worker.initialise(batch_norm(CHANNELS, momentum=momentum,
                                               dtype=torch.float64))
    steps, _ = sync_worker.batches(name)
    expected = []
    for mode, (x, grad_y) in zip(STEPS, steps):
        module.train(mode == "train")
        x = x.double().requires_grad_()
        module.weight.grad = module.bias.grad = None
        y = module(x)
        y.backward(grad_y.double())
        expected.append({"y": y.detach(), "grad_x": x.grad, "grad_weight": module.weight.grad,
                         "grad_bias": module.bias.grad,
                         "running_mean": module.running_mean.clone(),
                         "running_var": module.running_var.clone(),
                         "num_batches_tracked": module.num_batches_tracked.clone()})
    return expected


def tolerance(name):
    """1e-12 in float64. With data whose mean is large against its spread, normalizing loses
    digits in any method (x - mean rounds at |mean| * eps), torch's reference included:
    1e-12 relative to mean / std. (A sum of squares would lose (mean / std)^2 * eps, 1e-5
    here, and fail.)"""
    _, _, dtype, _, _, mean, _ = SCENARIOS[name]
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5)
    factor = max(1.0, mean / 3)
    return dict(rtol=1e-12 * factor, atol=1e-12 * factor)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_one_batch_norm_on_the_whole_batch(results, name):
    ranks = SCENARIOS[name][4] or tuple(range(WORLD_SIZE))
    expected = reference_steps(name)
    close = dict(tolerance(name))
    for step, want in enumerate(expected):
        parts = [results[rank][name][step] for rank in ranks]
        for key in ("y", "grad_x"):
            got = torch.cat([part[key].double() for part in parts])
            torch.testing.assert_close(got, want[key], **close, msg=f"{name} step {step} {key}")
        for key in ("grad_weight", "grad_bias"):  # local sums, as torch's: they add up
            got = sum(part[key].double() for part in parts)
            torch.testing.assert_close(got, want[key], **close, msg=f"{name} step {step} {key}")
        for part in parts:  # every process holds the same statistics
            for key in ("running_mean", "running_var"):
                torch.testing.assert_close(part[key].double(), want[key], **close,
                                           msg=f"{name} step {step} {key}")
            assert part["num_batches_tracked"] == want["num_batches_tracked"]
            if SCENARIOS[name][3] == torch.channels_last and part["y"].shape[0]:
                assert part["channels_last"]


def test_one_value_per_channel_over_the_group_raises_everywhere(results):
    for rank in range(WORLD_SIZE):
        result = results[rank]["too_few_values"]
        assert result["error"].startswith("Expected more than 1 value per channel when training")
        assert result["unchanged"]


def test_distributed_data_parallel(results):
    """A conv net with its BatchNorm layers converted, under DDP on uneven parts of each batch,
    trains as the same net on the whole batch (DDP averages gradients over the processes:
    the reference's loss is divided by their number)."""
    model = sync_worker.ddp_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    for x, grad_out in sync_worker.ddp_batches():
        optimizer.zero_grad()
        out = model(x)
        ((out * grad_out).sum() / WORLD_SIZE).backward()
        optimizer.step()
        outputs.append(out.detach())
    for step, want in enumerate(outputs):
        got = torch.cat([results[rank]["ddp"]["outputs"][step] for rank in range(WORLD_SIZE)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(results[rank]["ddp"]["state"], model.state_dict(),
                                   rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# One process: torch's API and behaviour without torch.distributed


@pytest.mark.parametrize("training", [True, False])
def test_without_torch_distributed_it_is_batch_norm(backend, training):
    """As torch's SyncBatchNorm: local BatchNorm when torch.distributed is not initialised."""
    assert not dist.is_initialized()
    reference = sync_worker.initialise(nn.BatchNorm2d(CHANNELS, dtype=torch.float64))
    module = sync_worker.initialise(fnn.SyncBatchNorm(CHANNELS, dtype=torch.float64,
                                                      backend=backend))
    reference.train(training)
    module.train(training)
    x = torch.randn(3, CHANNELS, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(x))
    torch.testing.assert_close(module.state_dict(), reference.state_dict())


def test_process_group_without_torch_distributed_raises():
    module = fnn.SyncBatchNorm(CHANNELS, process_group=object())
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        module(torch.randn(3, CHANNELS, 2, 2))
    torch.testing.assert_close(module.state_dict(), before, rtol=0, atol=0)
    module.eval()  # eval mode never synchronises: no error
    module(torch.randn(3, CHANNELS, 2, 2))


def test_torch_api_and_errors():
    module = fnn.SyncBatchNorm(CHANNELS)
    assert module.state_dict().keys() == nn.SyncBatchNorm(CHANNELS).state_dict().keys()
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    # DistributedDataParallel rejects torch's SyncBatchNorm in CPU models.
    assert not isinstance(module, nn.SyncBatchNorm)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        module(torch.randn(4))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        fnn.SyncBatchNorm(0)(torch.randn(2, 0, 3))
    assert repr(module).endswith("backend=None, process_group=None)")


def test_convert_sync_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                          nn.Sequential(nn.BatchNorm1d(4, affine=False).eval()),
                          fnn.GhostBatchNorm2d(4, 2))
    torch_version = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                      nn.Sequential(nn.BatchNorm1d(4, affine=False))))
    weight, running_mean = model[1].weight, model[1].running_mean
    converted = fnn.SyncBatchNorm.convert_sync_batchnorm(model, backend="numpy")
    assert converted is model
    assert [type(m) for m in (model[1], model[2][0], model[3])] == [fnn.SyncBatchNorm] * 3
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert model[2][0].weight is None and not model[2][0].training
    assert model[1].backend == "numpy"
    torch_state = torch_version.state_dict()
    assert model[:3].state_dict().keys() == torch_state.keys()
    model[:3].load_state_dict(torch_state)
    single = fnn.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(4))
    assert type(single) is fnn.SyncBatchNorm
