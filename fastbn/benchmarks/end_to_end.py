"""End to end: what a user feels. A training step (forward, cross-entropy, backward, SGD
step) or an eval forward of a reference network (`models`) with torch's layers, after
``fastbn.nn.convert`` with its defaults, and the two bounds of what any BatchNorm speed-up
can give: the network with its BatchNorm layers removed, and with the activation after
each BatchNorm removed too (a fused BatchNorm + activation replaces both).

torch is imported when a case is built, so this module imports without it.
"""
import copy

from fastbn.benchmarks import batch_norm

MODELS = ("mobilenet_v2", "resnet18")  # the report's; resnet50 on request (the sweep)
MODEL_TITLES = {"mobilenet_v2": "MobileNetV2", "resnet18": "ResNet-18", "resnet50": "ResNet-50"}
MODES = ("training", "eval")
IMPLEMENTATIONS = ("torch", "convert", "no_batch_norm", "no_batch_norm_activation")
IMPLEMENTATION_TITLES = {
    "torch": "torch's layers",
    "convert": "fastbn.nn.convert(model)",
    "no_batch_norm": "no BatchNorm",
    "no_batch_norm_activation": "no BatchNorm, no activation",
}
IMAGE_SIZE = 112
CLASSES = 100
BATCH_SIZES = (2, 8)
# float32 logits through a whole network: each side rounds its own intermediates.
TOLERANCE = 1e-3


def build_model(name, small=False):
    """The reference network `name` with CLASSES outputs; `small`: a narrow one for smoke
    tests (the same layers, fewer channels)."""
    from fastbn.benchmarks.models import MobileNetV2, ResNet, ResNet50

    if name == "mobilenet_v2":
        return MobileNetV2(num_classes=CLASSES, width_mult=0.25 if small else 1.0)
    if name == "resnet18":
        return ResNet(widths=(4, 8, 8, 8) if small else (64, 128, 256, 512),
                      num_classes=CLASSES)
    if name == "resnet50":
        return ResNet50(num_classes=CLASSES, blocks=(1, 1, 1, 1) if small else (3, 4, 6, 3))
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_TITLES)}")


def without(model, activations):
    """A copy of `model` with every BatchNorm2d, and with `activations` every ReLU and
    ReLU6 too, replaced by the identity."""
    from torch import nn

    removed = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6) if activations else (nn.BatchNorm2d,)
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, removed):
                setattr(parent, name, nn.Identity())
    return model


class NetworkCase:
    """One network, batch size and mode, in the four `IMPLEMENTATIONS` (separate copies
    of the same initial weights, each with its own SGD optimizer).

    Parameters
    ----------
    model : {"mobilenet_v2", "resnet18"}
    batch : int
    mode : {"training", "eval"}
    image_size : int
    small : bool
        Narrow networks, for smoke tests.
    seed : int
    """

    def __init__(self, model, batch, mode="training", image_size=IMAGE_SIZE, small=False,
                 seed=0):
        import torch

        import fastbn.nn

        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.model_name, self.batch, self.mode, self.image_size = model, batch, mode, image_size
        reference = build_model(model, small)
        self.models = {
            "torch": reference,
            "convert": fastbn.nn.convert(copy.deepcopy(reference)),
            "no_batch_norm": without(reference, activations=False),
            "no_batch_norm_activation": without(reference, activations=True),
        }
        for network in self.models.values():
            network.train(mode == "training")
        self.optimizers = {name: torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.9)
                           for name, network in self.models.items()}
        self.x = torch.randn(batch, 3, image_size, image_size, generator=generator)
        self.target = torch.randint(0, CLASSES, (batch,), generator=generator)

    def _train_step(self, name):
        from torch import nn

        optimizer = self.optimizers[name]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.models[name](self.x), self.target)
        loss.backward()
        optimizer.step()
        return loss.item()

    def _eval_forward(self, name):
        import torch

        with torch.no_grad():
            return self.models[name](self.x)

    def steps(self):
        """{implementation: callable running one training step (returning the loss) or one
        eval forward (returning the logits)}."""
        run = self._train_step if self.mode == "training" else self._eval_forward
        return {name: (lambda name=name: run(name)) for name in IMPLEMENTATIONS}

    def check(self):
        """Assert that the converted network's logits and loss match torch's layers' on
        this case's input (eval mode for both: dropout would differ).

        Not the gradients: through dozens of BatchNorm layers at initialisation, float32
        rounding alone moves some by about 1 % of their largest value (torch's own
        float32 ones against float64): tests/test_nn_fused.py checks the converted
        networks' gradients in float64.
        """
        import torch
        from torch import nn

        results = []
        for name in ("convert", "torch"):
            network = self.models[name]
            training = network.training
            network.eval()
            with torch.no_grad():
                logits = network(self.x)
            network.train(training)
            results.append([logits, nn.functional.cross_entropy(logits, self.target)])
        batch_norm.assert_outputs_match(
            results[0], results[1], TOLERANCE,
            f"{MODEL_TITLES[self.model_name]} after fastbn.nn.convert:",
            f"(batch {self.batch}, {self.image_size}x{self.image_size})")


def table(records):
    """Markdown lines: per network and mode, a row per batch size (records of
    `report.measure_networks`), with the fraction of the bounds fastbn captures."""
    from fastbn.benchmarks.report import _group, _spread

    if not records:
        return []
    first = records[0]
    lines = ["", f"## End to end: reference networks, {first['image_size']}x"
             f"{first['image_size']}, {first['dtype']}, {first['threads']} threads", "",
             "training: forward, cross-entropy, backward, SGD step; eval: a forward under "
             "torch.no_grad(). convert: fastbn.nn.convert(model) with its defaults (default "
             "routing, BatchNorm2d fused with the activation after it). The bounds remove "
             "every BatchNorm2d (and the activation after it): no BatchNorm speed-up can do "
             "better. captured: the part of the bound's saving that convert gets, "
             "(torch - convert) / (torch - bound).", "",
             "| network | mode | batch | torch ms | convert ms | speedup | no BN ms | "
             "no BN speedup | no BN, no act ms | no BN, no act speedup | captured | spread |",
             "|" + "---|" * 12]
    for (model, mode, batch), rows in _group(records, ("model", "mode", "batch")).items():
        at = {r["backend"]: r["median_s"] for r in rows}
        torch_s = at["torch"]
        bound = at["no_batch_norm_activation"]
        captured = (torch_s - at["convert"]) / (torch_s - bound) if torch_s > bound else 0.0
        lines.append(
            f"| {MODEL_TITLES[model]} | {mode} | {batch} | {torch_s * 1e3:.1f} | "
            f"{at['convert'] * 1e3:.1f} | {torch_s / at['convert']:.2f}x | "
            f"{at['no_batch_norm'] * 1e3:.1f} | {torch_s / at['no_batch_norm']:.2f}x | "
            f"{bound * 1e3:.1f} | {torch_s / bound:.2f}x | {captured:.0%} | "
            f"{_spread(rows):.0%} |")
    return lines


# Batch sizes of the module-level measurement on the networks' own BatchNorm shapes.
LAYER_BATCH_SIZES = (1, 2, 4, 8)


def batch_norm_sample_shapes(models=("mobilenet_v2", "resnet18"), image_size=IMAGE_SIZE):
    """The per-sample shapes (C, H, W) of every BatchNorm2d input in `models` at
    `image_size`, each once, largest first."""
    import torch
    from torch import nn

    found = set()
    for name in models:
        model = build_model(name)
        hooks = [module.register_forward_hook(
                     lambda module, inputs, output: found.add(tuple(inputs[0].shape[1:])))
                 for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
        for hook in hooks:
            hook.remove()
    return sorted(found, key=lambda shape: (-shape[0] * shape[1] * shape[2], shape))
