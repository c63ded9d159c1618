"""A ResNet in the torchvision style (torchvision is not a dependency): ResNet-18 for
the end-to-end row of ``python -m fastbn bench``, small ones for the fastbn.nn tests."""
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem (7x7 conv, BN, ReLU, max pool), stages of BasicBlocks, pooled linear head.

    ResNet(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)) is ResNet-18.
    """

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        layers = []
        in_channels = widths[0]
        for stage, (channels, count) in enumerate(zip(widths, blocks)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(in_channels, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.stem(x)))
