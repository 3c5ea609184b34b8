"""The seed's model, written faithfully so our batched model can be timed beside it.

The seed blog's ``Resnt18Rnn`` (PyTorch Computer Vision Cookbook, ch. 10): a torchvision ResNet18 with
``fc = Identity()`` called once per frame in a Python loop, each frame's features fed to an
``nn.LSTM`` *without* ``batch_first`` as ``[B, 1, 512]`` with the state carried by hand, dropout and a
linear layer on ``out[:, -1]``. Defaults as in the blog: hidden 100, one layer, dropout 0.1.

Kept as it was, bugs included: with ``B > 1`` the LSTM reads ``[B, 1, F]`` as a sequence of length B
(it mixes the clips of a batch); at the seed's own batch size of 1 it computes the intended model. In
training mode its BatchNorm normalises each frame with that frame's statistics alone (the trunk sees
one frame per call), while a batched trunk normalises over all B*T frames: outputs agree in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision import models


class Identity(nn.Module):
    """The seed's ``Identity`` (passes features through)."""

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` unchanged."""
        return x


class Resnt18Rnn(nn.Module):
    """The seed's CNN-RNN: per-frame ResNet18 loop, LSTM without batch_first (name kept as in the blog)."""

    def __init__(self, params_model: dict) -> None:
        super().__init__()
        num_classes = params_model["num_classes"]
        dr_rate = params_model["dr_rate"]
        rnn_hidden_size = params_model["rnn_hidden_size"]
        rnn_num_layers = params_model["rnn_num_layers"]
        # The blog passes pretrained=True; weights are copied in by ``load_from_ours`` instead.
        base_model = models.resnet18(weights=None)
        num_features = base_model.fc.in_features
        base_model.fc = Identity()
        self.baseModel = base_model
        self.dropout = nn.Dropout(dr_rate)
        self.rnn = nn.LSTM(num_features, rnn_hidden_size, rnn_num_layers)
        self.fc1 = nn.Linear(rnn_hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """The seed's forward over ``[B, T, C, H, W]``."""
        b_z, ts, c, h, w = x.shape
        ii = 0
        y = self.baseModel(x[:, ii])
        output, (hn, cn) = self.rnn(y.unsqueeze(1))
        for ii in range(1, ts):
            y = self.baseModel(x[:, ii])
            out, (hn, cn) = self.rnn(y.unsqueeze(1), (hn, cn))
        out = self.dropout(out[:, -1])
        out = self.fc1(out)
        return out


# our cnn_rnn's module names -> the seed's
_RENAME = (("trunk.", "baseModel."), ("rnn.", "rnn."), ("head.", "fc1."))


def seed_state_dict(ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``cnn_rnn`` state dict (LSTM, one direction, head "last") under the seed's names."""
    out = {}
    for key, value in ours.items():
        for src, dst in _RENAME:
            if key.startswith(src):
                out[dst + key[len(src):]] = value
                break
        else:
            raise KeyError(f"no seed counterpart for {key}")
    return out


def seed_like(model: nn.Module, dropout: float = 0.1) -> Resnt18Rnn:
    """A seed ``Resnt18Rnn`` holding a copy of ``model``'s (our ``cnn_rnn``'s) weights."""
    rnn = model.rnn
    if not isinstance(rnn, nn.LSTM) or rnn.bidirectional or model.head_mode != "last":
        raise ValueError("the seed model has a unidirectional LSTM and reads the last step")
    seed = Resnt18Rnn(
        {
            "num_classes": model.head.out_features,
            "dr_rate": dropout,
            "rnn_hidden_size": rnn.hidden_size,
            "rnn_num_layers": rnn.num_layers,
        }
    )
    seed.load_state_dict(seed_state_dict(model.state_dict()))
    return seed.to(next(model.parameters()).device)


@torch.no_grad()
def max_output_diff(ours: nn.Module, seed: nn.Module, x: Tensor) -> float:
    """Largest |ours - seed| logit difference in eval mode, the seed run one clip at a time."""
    was = ours.training, seed.training
    ours.eval()
    seed.eval()
    try:
        # One clip per call: the seed's LSTM only reads batches of 1 as intended.
        theirs = torch.cat([seed(x[i : i + 1]) for i in range(x.shape[0])])
        return (ours(x) - theirs).abs().max().item()
    finally:
        ours.train(was[0])
        seed.train(was[1])
