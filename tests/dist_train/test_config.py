"""Config: defaults, CLI > file > defaults, validation messages, --help."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from dist_train.config import TrainConfig, build_parser, parse_config


def test_defaults_are_valid_and_flags_override():
    cfg = parse_config(["--out", "runs/x"])
    assert cfg == TrainConfig(out="runs/x")
    cfg = parse_config(["--out", "o", "--no-hflip", "--batch-size", "3", "--lr", "0.1", "--pretrained", "none",
                        "--precision", "bf16", "--model", "r3d_18"])
    assert (cfg.hflip, cfg.batch_size, cfg.lr, cfg.pretrained, cfg.precision, cfg.model) == (
        False, 3, 0.1, None, "bf16", "r3d_18")


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_precedence_cli_over_file_over_defaults(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    values = {"out": "from_file", "epochs": 7, "hflip": False, "lr": 1}
    if suffix == ".yaml":
        path.write_text("out: from_file\nepochs: 7\nhflip: false\nlr: 1\n")
    elif suffix == ".toml":
        path.write_text('out = "from_file"\nepochs = 7\nhflip = false\nlr = 1\n')
    else:
        path.write_text(json.dumps(values))
    cfg = parse_config(["--config", str(path), "--epochs", "3"])
    assert cfg.epochs == 3  # CLI wins
    assert cfg.out == "from_file" and cfg.hflip is False  # file beats defaults
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.batch_size == TrainConfig.batch_size  # default


def test_resolved_config_json_is_a_config_file(tmp_path):
    cfg = TrainConfig(out="r", epochs=2, pretrained=None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert parse_config(["--config", str(path)]) == cfg


def test_file_with_dashed_keys_and_unknown_keys(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("out: r\nbatch-size: 5\n")
    assert parse_config(["--config", str(ok)]).batch_size == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: r\nbatch_sise: 5\n")
    with pytest.raises(ValueError, match="unknown field.*batch_sise"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="file not found"):
        parse_config(["--config", str(tmp_path / "missing.toml")])
    wrong_type = tmp_path / "t.toml"
    wrong_type.write_text('out = "r"\nepochs = "many"\n')
    with pytest.raises(ValueError, match="epochs must be int"):
        parse_config(["--config", str(wrong_type)])


@pytest.mark.parametrize("argv, message", [
    ([], "--out is required"),
    (["--out", "r", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--out", "r", "--val-fraction", "1.0"], "--val-fraction must be in"),
    (["--out", "r", "--keep-last", "0"], "--keep-last must be >= 1"),
    (["--out", "r", "--model", "r3d_18", "--pretrained", "imagenet"], "kinetics"),
    (["--out", "r", "--pretrained", "kinetics"], "imagenet"),
    (["--out", "r", "--freeze-trunk", "--trunk-lr-scale", "0.1"], "contradict"),
    (["--out", "r", "--crop-scale", "0"], "--crop-scale"),
])
def test_validation_says_what_to_change(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_help_documents_every_flag_with_default():
    text = build_parser().format_help()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert text.count("(default:") >= len(fields(TrainConfig))
    assert "--no-hflip" in text and "Exit status" in text


def test_optional_and_auto_fields_parse_from_flags_and_files(tmp_path):
    """Field types come from the annotations: ``int | None`` takes an integer or none, --workers auto or an integer."""
    cfg = parse_config(["--out", "o", "--global-batch", "12", "--workers", "3"])
    assert (cfg.global_batch, cfg.workers) == (12, 3)
    assert parse_config(["--out", "o"]).global_batch is None and TrainConfig(out="o").workers == "auto"
    assert parse_config(["--out", "o", "--global-batch", "none"]).global_batch is None
    path = tmp_path / "c.yaml"
    path.write_text("out: o\nglobal_batch: null\nworkers: 2\n")
    cfg = parse_config(["--config", str(path)])
    assert cfg.global_batch is None and cfg.workers == 2
    path.write_text("out: o\nglobal_batch: many\n")
    with pytest.raises(ValueError, match="global_batch must be int or null"):
        parse_config(["--config", str(path)])
    with pytest.raises(SystemExit):  # argparse: not an integer
        parse_config(["--out", "o", "--global-batch", "x"])
    for bad in (["--workers", "-1"], ["--workers", "lots"], ["--global-batch", "0"], ["--shuffle-window", "0"]):
        with pytest.raises((ValueError, SystemExit)):
            parse_config(["--out", "o", *bad])
