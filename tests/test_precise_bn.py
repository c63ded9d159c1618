"""precise_bn against the average of per-batch statistics recorded independently (forward
hooks on the layers' inputs), and what it must leave as it was."""
import itertools

import pytest
import torch
from torch import nn

import fastbn.nn as fnn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 5, 1), fnn.BatchNorm2d(5, momentum=None, backend="numpy"),
                         fnn.GhostBatchNorm2d(5, 2, backend="numpy"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(5)).double()


def make_batches(sizes=(4, 2, 3, 5)):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 6, 6, dtype=torch.float64, generator=generator) * 2 + 1
            for n in sizes]


def recorded_statistics(model, batches):
    """Each BatchNorm layer's input on each batch in a precise pass (BatchNorm layers in
    training mode, the rest as they are), and from it the expected statistics: per batch
    (per virtual batch for Ghost BatchNorm) mean and unbiased variance, averaged with
    weights n (values per channel; 1 per virtual batch)."""
    inputs = {}
    hooks = [module.register_forward_pre_hook(
        lambda module, args, name=name: inputs.setdefault(name, []).append(args[0]))
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    modes = {module: module.training for module in model.modules()}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for module, training in modes.items():
        module.train(training)
    for hook in hooks:
        hook.remove()
    expected = {}
    for name, xs in inputs.items():
        ghost = isinstance(model.get_submodule(name), fnn.GhostBatchNorm2d)
        parts = list(itertools.chain.from_iterable(x.split(2) for x in xs)) if ghost else xs
        dims = [0] + list(range(2, parts[0].dim()))
        weights = torch.tensor([1.0 if ghost else x.numel() / x.shape[1] for x in parts],
                               dtype=torch.float64)
        means = torch.stack([x.mean(dims) for x in parts])
        variances = torch.stack([x.var(dims) for x in parts])
        expected[name] = ((weights[:, None] * means).sum(0) / weights.sum(),
                          (weights[:, None] * variances).sum(0) / weights.sum())
    return expected


def state_of(model):
    return {name: (module.training, module.momentum,
                   module.num_batches_tracked.clone(), module.running_mean.clone(),
                   module.running_var.clone())
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)}


def test_running_statistics_are_the_average_over_batches():
    model = make_model().eval()
    model[1].train()
    batches = make_batches()
    dropout_training = model[3].training
    # The recorded pass uses no running statistic, so it sees what precise_bn's will (it
    # updates them, so the state before precise_bn is taken after it).
    expected = recorded_statistics(model, batches)
    before = state_of(model)
    changes = fnn.precise_bn(model, batches, num_batches=len(batches), progress=False)
    assert set(changes) == set(expected) == {"1", "5", "6", "9"}
    for name, (mean, var) in expected.items():
        layer = model.get_submodule(name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(changes[name].new_var, var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(changes[name].old_mean, before[name][3], rtol=0, atol=0)
        training, momentum, num_batches_tracked, _, _ = before[name]
        assert (layer.training, layer.momentum) == (training, momentum)
        assert torch.equal(layer.num_batches_tracked, num_batches_tracked)
    assert model[3].training == dropout_training
    assert changes["1"].mean_shift > 0 and changes["1"].var_ratio > 1


def test_num_batches_and_batch_forms(recwarn):
    batches = make_batches((3, 3, 3))
    model = make_model()
    taken = []

    def generator():
        for batch in batches:
            taken.append(batch)
            yield (batch, "target")  # a data loader's (inputs, targets)

    fnn.precise_bn(model, generator(), num_batches=2, progress=False)
    assert len(taken) == 2  # no item past the last one used
    expected = make_model()
    fnn.precise_bn(expected, [{"input": b} for b in batches[:2]], progress=False)
    assert len(recwarn) == 1 and "ran 2 batches" in str(recwarn[0].message)
    torch.testing.assert_close(model.state_dict(), expected.state_dict())


def test_progress_bar(capsys):
    fnn.precise_bn(make_model(), make_batches((2, 2)), num_batches=2)
    assert "precise_bn" in capsys.readouterr().err


def test_failure_restores_everything():
    model = make_model().eval()
    before = state_of(model)
    batches = make_batches() + [torch.randn(2, 4, 6, 6, dtype=torch.float64)]  # wrong channels
    with pytest.raises(RuntimeError):
        fnn.precise_bn(model, batches, progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        fnn.precise_bn(model, [], progress=False)
    with pytest.raises(ValueError, match="num_batches must be an int >= 1"):
        fnn.precise_bn(model, make_batches(), num_batches=0)
    after = state_of(model)
    for name, (training, momentum, *tensors) in before.items():
        assert after[name][:2] == (training, momentum)
        for a, b in zip(after[name][2:], tensors):
            assert torch.equal(a, b)
