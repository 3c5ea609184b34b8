"""Models: shapes, heads, batched trunk, batch_first, pretrained loading, freezing."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights
from torchvision.models.video import MC3_18_Weights

from dist_train.models import (
    CNNRNN,
    MODELS,
    PretrainedWeightsNotFound,
    build_model,
    input_layout,
    trunk_parameters,
)

B, T, S = 2, 4, 32  # tiny clips keep these tests fast on 2 shared cores


def clip(name: str, b: int = B, t: int = T, seed: int = 0) -> torch.Tensor:
    """A random batch in the layout ``name`` expects."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 3, S, S, generator=g)
    return x if input_layout(name) == "BTCHW" else x.permute(0, 2, 1, 3, 4).contiguous()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private, empty torch hub cache; yields its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if not torch.hub.get_dir().startswith(str(tmp_path)):
        pytest.skip("torch.hub.set_dir was called earlier in this process; TORCH_HOME is ignored")
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    return ckpt


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_layout(name):
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    assert input_layout(name) == ("BTCHW" if name == "cnn_rnn" else "BCTHW")
    with torch.no_grad():
        assert model(clip(name)).shape == (B, 7)
        assert model(clip(name, b=1)).shape == (1, 7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rnn="lstm", head="last"),
        dict(rnn="gru", head="mean"),
        dict(rnn="lstm", head="last", bidirectional=True, layers=2, dropout=0.2),
        dict(rnn="gru", head="last", bidirectional=True, hidden=16),
    ],
)
def test_heads_read_the_right_rnn_outputs(kw):
    torch.manual_seed(0)
    model = build_model("cnn_rnn", 3, **kw).eval()
    rnn = model.rnn
    assert isinstance(rnn, torch.nn.GRU if kw["rnn"] == "gru" else torch.nn.LSTM)
    assert rnn.batch_first and rnn.bidirectional == kw.get("bidirectional", False)
    assert rnn.num_layers == kw.get("layers", 1) and rnn.hidden_size == kw.get("hidden", 256)
    seen = {}
    # (hooks must return None: a returned value would replace the module's output)
    model.rnn.register_forward_hook(lambda m, i, o: seen.update(out=o[0]))
    model.head.register_forward_hook(lambda m, i, o: seen.update(head_in=i[0]))
    with torch.no_grad():
        model(clip("cnn_rnn"))
    out, h = seen["out"], rnn.hidden_size
    assert out.shape[:2] == (B, T)
    if kw["head"] == "mean":
        expected = out.mean(1)
    elif rnn.bidirectional:
        # forward direction ends at the last step, backward direction at the first
        expected = torch.cat([out[:, -1, :h], out[:, 0, h:]], dim=-1)
    else:
        expected = out[:, -1]
    torch.testing.assert_close(seen["head_in"], expected)


def test_trunk_runs_once_on_all_frames():
    model = build_model("cnn_rnn", 3).eval()
    calls = []
    model.trunk.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    with torch.no_grad():
        model(clip("cnn_rnn", b=3, t=5))
    assert calls == [(15, 3, S, S)]


def test_batch_first_clips_are_independent():
    # With batch and time swapped, clip 0's logits would depend on the other clips of the batch.
    torch.manual_seed(0)
    model = build_model("cnn_rnn", 4, hidden=32).eval()
    x = clip("cnn_rnn", b=3, seed=1)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        swapped_batch = model(x.flip(0))
        reversed_time = model(x.flip(1))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(swapped_batch, together.flip(0), atol=1e-5, rtol=1e-4)
    # ... and the order of frames matters (the RNN runs over time, not over the batch).
    assert not torch.allclose(reversed_time, together, atol=1e-4)


def test_state_dict_keys_are_clean_and_torchvision_compatible():
    cnn = build_model("cnn_rnn", 3)
    keys = set(cnn.state_dict())
    resnet_keys = {f"trunk.{k}" for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert resnet_keys <= keys
    assert {k.split(".")[0] for k in keys} == {"trunk", "rnn", "head"}
    r3d = build_model("r3d_18", 3)
    assert list(r3d.state_dict()) == list(torchvision.models.video.r3d_18(num_classes=3).state_dict())


def test_channels_last_gives_same_logits():
    torch.manual_seed(0)
    model = build_model("cnn_rnn", 3).eval()
    x = clip("cnn_rnn")
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        seen = []
        model.trunk.conv1.register_forward_hook(
            lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last))
        )
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    assert seen == [True]


def test_works_under_torch_compile():
    torch.manual_seed(0)
    model = build_model("cnn_rnn", 3, rnn="gru", bidirectional=True)
    x = clip("cnn_rnn")
    ref = model(x)
    # Dynamo runs nn.LSTM/GRU eagerly (a graph break) and compiles the trunk and head around it.
    # aot_eager traces like the default backend but skips C++ code generation (seconds, not a minute).
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert model.trunk.conv1.weight.grad is not None and model.head.weight.grad is not None
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="resnet50"), "cnn_rnn, r3d_18, mc3_18, r2plus1d_18"),
        (dict(rnn="transformer"), "lstm, gru"),
        (dict(head="max"), "last, mean"),
        (dict(pretrained="kinetics"), "imagenet"),
        (dict(name="r3d_18", pretrained="imagenet"), "kinetics"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_options_raise_value_error(kw, match):
    name = kw.pop("name", "cnn_rnn")
    with pytest.raises(ValueError, match=match):
        build_model(name, 3, **kw)
    with pytest.raises(ValueError, match="r2plus1d_18"):
        input_layout("r2plus1d")


def test_imagenet_weights_from_hub_cache(hub):
    torch.manual_seed(123)
    saved = torchvision.models.resnet18().state_dict()  # random init, 1000-class fc included
    torch.save(saved, hub / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url))
    model = build_model("cnn_rnn", 5, pretrained="imagenet")
    trunk = model.trunk.state_dict()
    assert set(trunk) == {k for k in saved if not k.startswith("fc.")}
    for k, v in trunk.items():
        assert torch.equal(v, saved[k]), k
    assert model.head.out_features == 5
    # A model built without weights really differs (the comparison above is not vacuous).
    assert not torch.equal(build_model("cnn_rnn", 5).trunk.conv1.weight, saved["conv1.weight"])


def test_kinetics_weights_drop_the_400_class_fc(hub):
    torch.manual_seed(7)
    saved = torchvision.models.video.mc3_18().state_dict()  # 400 classes like Kinetics
    torch.save(saved, hub / os.path.basename(MC3_18_Weights.KINETICS400_V1.url))
    model = build_model("mc3_18", 6, pretrained="kinetics")
    got = model.state_dict()
    assert got["fc.weight"].shape == (6, 512)
    for k, v in saved.items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name, pretrained", [("cnn_rnn", "imagenet"), ("r2plus1d_18", "kinetics")])
def test_missing_weights_name_the_file_and_folder(hub, name, pretrained):
    with pytest.raises(FileNotFoundError) as info:
        build_model(name, 3, pretrained=pretrained)
    assert isinstance(info.value, PretrainedWeightsNotFound)
    msg = str(info.value)
    file = {"cnn_rnn": "resnet18-f37072fd.pth", "r2plus1d_18": "r2plus1d_18-91a641e6.pth"}[name]
    assert file in msg and str(hub) in msg
    assert f"https://download.pytorch.org/models/{file}" in msg
    assert list(hub.iterdir()) == []  # nothing was downloaded


def test_weights_from_a_path(tmp_path):
    torch.manual_seed(1)
    saved = torchvision.models.resnet18().state_dict()
    path = tmp_path / "my_resnet.pth"
    torch.save(saved, path)
    model = build_model("cnn_rnn", 3, pretrained=str(path))
    assert torch.equal(model.trunk.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])

    # A whole model of ours, saved from a DDP + compile wrapped module, restores everything incl. the head.
    whole = build_model("cnn_rnn", 3, rnn="gru").state_dict()
    torch.save({f"module._orig_mod.{k}": v for k, v in whole.items()}, path)
    again = build_model("cnn_rnn", 3, rnn="gru", pretrained=str(path)).state_dict()
    assert all(torch.equal(again[k], v) for k, v in whole.items())

    # A file for another architecture is refused with the file's name, not loaded half-way.
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(ValueError, match="my_resnet.pth"):
        build_model("cnn_rnn", 3, pretrained=str(path))
    with pytest.raises(ValueError, match="does not fit r3d_18"):
        build_model("r3d_18", 3, pretrained=str(path))

    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot load weights file"):
        build_model("cnn_rnn", 3, pretrained=str(path))

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("cnn_rnn", 3, pretrained=str(tmp_path / "nope.pth"))


def test_freeze_trunk_cnn_rnn():
    torch.manual_seed(0)
    model = build_model("cnn_rnn", 3, freeze_trunk=True).train()
    trunk = trunk_parameters(model)
    assert len(trunk) == len(list(model.trunk.parameters())) and all(not p.requires_grad for p in trunk)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("rnn.", "head.")) for n in trainable)
    assert not model.trunk.training and model.rnn.training
    stats = model.trunk.bn1.running_mean.clone()
    model(clip("cnn_rnn")).sum().backward()
    assert torch.equal(model.trunk.bn1.running_mean, stats)  # BatchNorm statistics stay fixed
    assert all(p.grad is None for p in trunk) and model.head.weight.grad is not None


def test_freeze_trunk_3d():
    model = build_model("r3d_18", 3, freeze_trunk=True).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert len(trunk_parameters(model)) == len(list(model.parameters())) - 2
    model(clip("r3d_18", b=1)).sum().backward()
    assert model.stem[0].weight.grad is None and model.fc.weight.grad is not None


def test_unfrozen_trunk_trains():
    model = build_model("cnn_rnn", 3).train()
    assert all(p.requires_grad for p in trunk_parameters(model))
    model(clip("cnn_rnn")).sum().backward()
    assert model.trunk.conv1.weight.grad is not None
    assert isinstance(model, CNNRNN)
    with pytest.raises(TypeError):
        trunk_parameters(torch.nn.Linear(2, 2))
