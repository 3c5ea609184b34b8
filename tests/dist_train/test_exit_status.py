"""Exit status 2 means bad configuration, and only that: the real ``python -m dist_train`` on bad values, a config
file with a key given twice and a --pretrained file that is not there; and which model errors are ConfigErrors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision

from dist_train.faults import EXIT_CONFIG, EXIT_ERROR, ConfigError
from dist_train.models import PretrainedWeightsNotFound, build_model
from tests.dist_train.dt_helpers import TINY, check, run_trainer


def test_bad_values_and_a_key_given_twice_exit_2_before_training(tmp_path):
    out = tmp_path / "run"
    proc = check(run_trainer(["--out", str(out), "--lr", "nan"], nproc=None), EXIT_CONFIG)
    assert proc.stderr.strip() == "error: --lr must be a finite number, got nan"
    config = tmp_path / "exp.yaml"
    config.write_text(f"out: {out}\nepochs: 3\nlr: 0.1\nepochs: 30\n")
    proc = check(run_trainer(["--config", str(config)], nproc=None), EXIT_CONFIG)
    assert proc.stderr.strip() == f"error: --config {config}: 'epochs' is given twice (line 4): remove one of them"
    assert not out.exists()  # refused before anything was made


def test_a_missing_pretrained_file_exits_2_naming_it(sample_shards, tmp_path):
    weights = tmp_path / "resnet18_typo.pth"
    proc = check(run_trainer(["--shards", str(sample_shards), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1",
                              "--pretrained", str(weights)], nproc=None), EXIT_CONFIG)
    assert f"error: pretrained weights file {weights} not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_errors_are_config_errors_only_for_configuration(tmp_path):
    """What --model/--pretrained ask for is configuration (exit 2, whatever the trainer converts); arguments the
    config has checked already, or a data set without classes, are not: they are bugs or data errors (exit 1)."""
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsNotFound, match="nope.pth") as info:
        build_model("cnn_rnn", 3, pretrained=str(missing))
    assert isinstance(info.value, ConfigError) and isinstance(info.value, FileNotFoundError)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=f"cannot load weights file {bad}"):
        build_model("cnn_rnn", 3, pretrained=str(bad))
    torch.save([torch.zeros(1)], bad)
    with pytest.raises(ConfigError, match=f"weights file {bad} .*does not hold a state dict"):
        build_model("cnn_rnn", 3, pretrained=str(bad))
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    with pytest.raises(ConfigError, match=f"weights file {bad} does not fit r3d_18"):
        build_model("r3d_18", 3, pretrained=str(bad))
    with pytest.raises(ConfigError, match="does not apply to r3d_18"):
        build_model("r3d_18", 3, pretrained="imagenet")
    for kw in (dict(name="resnet50"), dict(rnn="transformer"), dict(head="max")):
        with pytest.raises(ConfigError, match="unknown"):
            build_model(kw.pop("name", "cnn_rnn"), 3, **kw)
    for num_classes, kw in ((0, {}), (3, dict(dropout=1.5)), (3, dict(hidden=0))):
        with pytest.raises(ValueError) as info:
            build_model("cnn_rnn", num_classes, **kw)
        assert not isinstance(info.value, ConfigError), info.value


def test_a_damaged_manifest_is_a_data_error_exit_1_with_its_message(sample_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["count"] = -3
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = check(run_trainer(["--shards", str(shards), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1"],
                             nproc=None), EXIT_ERROR)
    assert proc.stderr.strip().startswith(f"error: {shards / 'manifest.json'}") and "count" in proc.stderr
    assert "Traceback" not in proc.stderr
