"""Video classifiers: a batched ResNet18 + LSTM/GRU (``cnn_rnn``) and torchvision's 3D ResNets.

Input layouts (``input_layout``): ``cnn_rnn`` takes ``[B, T, C, H, W]``; the 3D CNNs take
``[B, C, T, H, W]``. Pretrained weights come from torchvision's weight enums, read from the torch hub
cache (``$TORCH_HOME/hub/checkpoints``) or an explicit file; the network is never used.

Errors: ``ConfigError`` (exit status 2) for what the run was asked to build: an unknown choice, pretrained
weights that are missing, unloadable or do not fit the model. Plain ``ValueError`` / ``TypeError`` for
arguments the trainer has checked already (a bug if one reaches here from a run) and for data (no classes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights
from torchvision.models.video import MC3_18_Weights, R2Plus1D_18_Weights, R3D_18_Weights
from torchvision.models.video import resnet as video_resnet

from dist_train.config import HEADS, MODEL_NAMES, RNNS
from dist_train.faults import ConfigError

MODELS = MODEL_NAMES  # the choices are listed once, in config.py
FEATURES = 512  # ResNet18's pooled feature width

# name -> (block layout for VideoResNet, pretrained-weights enum value)
_VIDEO_SPECS = {
    "r3d_18": ([video_resnet.Conv3DSimple] * 4, video_resnet.BasicStem, R3D_18_Weights.KINETICS400_V1),
    "mc3_18": (
        [video_resnet.Conv3DSimple] + [video_resnet.Conv3DNoTemporal] * 3,
        video_resnet.BasicStem,
        MC3_18_Weights.KINETICS400_V1,
    ),
    "r2plus1d_18": (
        [video_resnet.Conv2Plus1D] * 4,
        video_resnet.R2Plus1dStem,
        R2Plus1D_18_Weights.KINETICS400_V1,
    ),
}
# Which named weights each model family accepts.
_NAMED_PRETRAINED = {"cnn_rnn": ("imagenet", ResNet18_Weights.IMAGENET1K_V1)} | {
    name: ("kinetics", spec[2]) for name, spec in _VIDEO_SPECS.items()
}


class PretrainedWeightsNotFound(ConfigError, FileNotFoundError):
    """Pretrained weights are not on disk (and are never downloaded): a configuration error."""


class CNNRNN(nn.Module):
    """ResNet18 run once on all B*T frames, then an LSTM/GRU over time, then a linear head."""

    def __init__(
        self,
        num_classes: int,
        rnn: str = "lstm",
        hidden: int = 256,
        layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        head: str = "last",
    ) -> None:
        super().__init__()
        self.trunk = torchvision.models.resnet18(weights=None)
        self.trunk.fc = nn.Identity()  # keeps the trunk's keys identical to torchvision's minus fc.*
        rnn_cls = nn.LSTM if rnn == "lstm" else nn.GRU
        # nn.LSTM's own dropout acts only between stacked layers (and warns with one layer).
        self.rnn = rnn_cls(
            FEATURES,
            hidden,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)  # no parameters, so no state_dict keys
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)
        self.head_mode = head
        self.frozen_trunk = False

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for clips ``[B, T, C, H, W]``."""
        b, t = x.shape[:2]
        frames = x.flatten(0, 1)
        if self.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            # A 5D clip cannot be 4D-channels_last; convert the frames so the convs stay in NHWC.
            frames = frames.contiguous(memory_format=torch.channels_last)
        if self.frozen_trunk:
            # A frozen trunk needs no activations kept for backward: much less time and memory.
            with torch.no_grad():
                feats = self.trunk(frames)
        else:
            feats = self.trunk(frames)
        out, h_n = self.rnn(feats.view(b, t, -1))
        if self.head_mode == "mean":
            pooled = out.mean(dim=1)
        else:
            h_n = h_n[0] if isinstance(h_n, tuple) else h_n  # LSTM returns (h_n, c_n)
            # h_n holds the last layer's final state per direction: for a bidirectional RNN the
            # backward direction's "last" state is at t=0, which out[:, -1] would miss.
            k = 2 if self.rnn.bidirectional else 1
            pooled = h_n[-k:].transpose(0, 1).flatten(1)  # [B, k*H]: forward state, then backward
        return self.head(self.drop(pooled))

    def train(self, mode: bool = True) -> CNNRNN:
        """Like ``nn.Module.train``, but a frozen trunk stays in eval (its BatchNorm stats fixed)."""
        super().train(mode)
        if self.frozen_trunk:
            self.trunk.eval()
        return self


class _DropoutLinear(nn.Linear):
    """``nn.Linear`` with dropout on its input; same state_dict keys as a plain Linear."""

    def __init__(self, in_features: int, out_features: int, p: float) -> None:
        super().__init__(in_features, out_features)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Dropout, then the linear map."""
        return super().forward(nn.functional.dropout(x, self.p, self.training))


class VideoCNN(video_resnet.VideoResNet):
    """torchvision's VideoResNet (same state_dict keys) with trunk freezing and channels_last input."""

    frozen_trunk = False

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` for clips ``[B, C, T, H, W]``."""
        stem_weight = self.stem[0].weight
        if stem_weight.is_contiguous(memory_format=torch.channels_last_3d):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_trunk):
            x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
            x = self.avgpool(x).flatten(1)
        return self.fc(x)

    def train(self, mode: bool = True) -> VideoCNN:
        """Like ``nn.Module.train``, but a frozen trunk stays in eval (its BatchNorm stats fixed)."""
        super().train(mode)
        if self.frozen_trunk:
            for name, child in self.named_children():
                if name != "fc":
                    child.eval()
        return self


def _choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")


def input_layout(name: str) -> str:
    """``"BTCHW"`` for ``cnn_rnn``, ``"BCTHW"`` for the 3D CNNs."""
    _choice("model", name, MODELS)
    return "BTCHW" if name == "cnn_rnn" else "BCTHW"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def trunk_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The backbone's parameters (everything but the RNN and head / the final fc)."""
    model = unwrap(model)
    if isinstance(model, CNNRNN):
        return list(model.trunk.parameters())
    if isinstance(model, video_resnet.VideoResNet):
        return [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    raise TypeError(f"not a model from build_model: {type(model).__name__}")


def hub_weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision would cache ``weights``: ``<torch.hub.get_dir()>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _find_weights(model_name: str, pretrained: str) -> Path:
    kind, weights = _NAMED_PRETRAINED[model_name]
    if pretrained in ("imagenet", "kinetics"):
        if pretrained != kind:
            raise ConfigError(
                f"--pretrained {pretrained} does not apply to {model_name}; use {kind!r} or a file path"
            )
        path = hub_weights_file(weights)
        if not path.is_file():
            raise PretrainedWeightsNotFound(
                f"pretrained weights for {model_name} ({weights}) not found: expected the file "
                f"{path.name} in {path.parent} (the torch hub cache; set TORCH_HOME to move it). "
                f"Download it on a machine with internet from {weights.url} and copy it there, "
                f"or pass its path with --pretrained PATH. Nothing is downloaded automatically."
            )
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise PretrainedWeightsNotFound(
            f"pretrained weights file {path} not found (--pretrained takes {kind!r} or a path to a "
            f"state-dict file)"
        )
    return path


def _state_dict_from(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects beyond tensors
        raise ConfigError(f"cannot load weights file {path} (--pretrained) with weights_only=True: {e}") from e
    # Accept a training checkpoint too: its model state lives under "model".
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"weights file {path} (--pretrained) does not hold a state dict (a mapping of names to "
                          "tensors)")
    # Strip wrapper prefixes so files saved from DDP / torch.compile models load too.
    out = {}
    for key, value in obj.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _load_pretrained(model: nn.Module, model_name: str, pretrained: str) -> None:
    path = _find_weights(model_name, pretrained)
    state = _state_dict_from(path)
    target: nn.Module = model
    optional: tuple[str, ...] = ()  # keys that may be missing from the file
    if isinstance(model, CNNRNN):
        if not any(k.startswith("trunk.") for k in state):  # else: a whole cnn_rnn saved by us
            # A torchvision ResNet18 state dict: its 1000-class fc has no place here.
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            target = model.trunk
    else:
        fc_shape = (model.fc.out_features, model.fc.in_features)
        if "fc.weight" in state and tuple(state["fc.weight"].shape) != fc_shape:
            # Kinetics' 400-class head (or another class count): keep our freshly initialised fc.
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        optional = ("fc.",)
    own = target.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"weights file {path} does not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches (file vs model) {shapes[:5]}"
        )
    target.load_state_dict(state, strict=False)


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str | None = None,
    rnn: str = "lstm",
    hidden: int = 256,
    layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    head: str = "last",
    freeze_trunk: bool = False,
) -> nn.Module:
    """Build a video classifier; RNN options (rnn, hidden, layers, bidirectional, head) apply to cnn_rnn only.

    ``pretrained``: None, ``"imagenet"`` (cnn_rnn's ResNet18 trunk), ``"kinetics"`` (3D CNNs) or a path to
    a state-dict file (torchvision backbone or a whole model of ours). ``dropout`` acts before the
    classifier (and between stacked RNN layers).
    """
    _choice("model", name, MODELS)
    _choice("rnn", rnn, RNNS)
    _choice("head", head, HEADS)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if hidden < 1 or layers < 1:
        raise ValueError(f"hidden and layers must be >= 1, got hidden={hidden}, layers={layers}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    model: nn.Module
    if name == "cnn_rnn":
        model = CNNRNN(num_classes, rnn, hidden, layers, bidirectional, dropout, head)
    else:
        conv_makers, stem, _ = _VIDEO_SPECS[name]
        model = VideoCNN(video_resnet.BasicBlock, conv_makers, [2, 2, 2, 2], stem, num_classes=num_classes)
        fc = _DropoutLinear(model.fc.in_features, num_classes, dropout)
        fc.load_state_dict(model.fc.state_dict())  # keep VideoResNet's own fc initialisation
        model.fc = fc
    if pretrained is not None:
        _load_pretrained(model, name, pretrained)
    if freeze_trunk:
        for p in trunk_parameters(model):
            p.requires_grad_(False)
        model.frozen_trunk = True
        model.train(model.training)
    return model
