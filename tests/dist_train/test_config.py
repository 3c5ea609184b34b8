"""Config: defaults, CLI > file > defaults, validation messages, --help."""

from __future__ import annotations

import json
import re
import typing
from dataclasses import fields

import pytest

from dist_train.config import LIMITS, TrainConfig, build_parser, load_config_file, parse_config


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


# ------------------------------------------------------------------ values that can only be mistakes
FLOAT_FIELDS = [f.name for f in fields(TrainConfig) if typing.get_type_hints(TrainConfig)[f.name] is float]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_every_float_flag_refuses_non_finite_values(name, text):
    with pytest.raises(ValueError, match=f"^{flag(name)} must be a finite number, got {text}$"):
        parse_config(["--out", "o", f"{flag(name)}={text}"])  # = : argparse takes -inf for a flag otherwise


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "out: o\nlr: .nan\n"), (".yaml", "out: o\ndist_timeout: .inf\n"),
    (".json", '{"out": "o", "lr": NaN}'), (".json", '{"out": "o", "grad_clip": Infinity}'),
    (".toml", 'out = "o"\nlr = nan\n'), (".toml", 'out = "o"\nweight_decay = inf\n'),
])
def test_non_finite_values_in_config_files_are_refused(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"^--[a-z-]+ must be a finite number, got (nan|inf)$"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("suffix, text, name", [
    (".yaml", "out: o\nlr: null\n", "lr"), (".yaml", "out: o\nepochs: ~\n", "epochs"),
    (".yaml", "out: o\nhflip: null\n", "hflip"), (".json", '{"out": null}', "out"),
    (".json", '{"out": "o", "model": null}', "model"),
])
def test_null_for_a_field_that_is_not_optional_is_refused(tmp_path, suffix, text, name):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"config field {name} must be .*, got null"):
        parse_config(["--config", str(path)])


def test_wrong_types_built_in_code_are_value_errors_naming_the_flag():
    """TrainConfig(...) itself (not only the file and flag parsers) refuses with ValueError, never TypeError."""
    with pytest.raises(ValueError, match="--lr must be given a value"):
        TrainConfig(out="o", lr=None)
    with pytest.raises(ValueError, match="--epochs must be int, got '3'"):
        TrainConfig(out="o", epochs="3")
    with pytest.raises(ValueError, match="--batch-size must be int, got True"):
        TrainConfig(out="o", batch_size=True)
    assert TrainConfig(out="o", lr=1).lr == 1.0 and isinstance(TrainConfig(out="o", lr=1).lr, float)
    assert TrainConfig(out="o", global_batch=None).global_batch is None


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_absurd_sizes_are_refused_and_the_limit_itself_is_not(name):
    most = LIMITS[name][0]
    base = ["--out", "o", "--epochs", "100000"] if name in ("warmup_epochs", "test_every") else ["--out", "o"]
    with pytest.raises(ValueError, match=f"^{flag(name)} must be at most {most:,} "):
        parse_config([*base, flag(name), str(most + 1)])
    assert getattr(parse_config([*base, flag(name), str(most)]), name) == most


@pytest.mark.parametrize("argv, message", [
    (["--img-size", "100000"], r"--img-size must be at most 1,024 \(pixels"),
    (["--workers", "100000"], "--workers must be at most 256"),
    (["--hidden-size", str(10**9)], "--hidden-size must be at most 16,384"),
    (["--batch-size", str(10**7)], "--batch-size must be at most 65,536"),
    (["--epochs", str(10**9)], "--epochs must be at most 100,000"),
    (["--seed", str(-2**32)], "--seed must be at least -4,294,967,295"),
])
def test_absurd_values_from_the_issue(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_config(["--out", "o", *argv])


def test_what_real_hmdb51_and_kinetics_runs_pass_is_accepted(tmp_path):
    cfg = parse_config(["--out", "o", "--model", "r2plus1d_18", "--pretrained", "kinetics", "--img-size", "224",
                        "--workers", "32", "--batch-size", "64", "--global-batch", "2048", "--epochs", "200",
                        "--shuffle-window", "8000", "--seed", "-1", "--dist-timeout", "7200", "--lr", "0.1",
                        "--warmup-epochs", "5", "--keep-last", "1000", "--log-every", "100000",
                        "--ckpt-every-steps", "1000000", "--ckpt-every-minutes", "100000"])
    assert (cfg.img_size, cfg.workers, cfg.global_batch, cfg.seed) == (224, 32, 2048, -1)
    cfg = parse_config(["--out", "o", "--hidden-size", "4096", "--rnn-layers", "4", "--bidirectional",
                        "--img-size", "320", "--workers", "auto"])
    assert (cfg.hidden_size, cfg.rnn_layers, cfg.workers) == (4096, 4, "auto")
    path = tmp_path / "c.yaml"  # YAML 1.1 (PyYAML) reads 1e-3 as a string; written like this it is a float
    path.write_text("out: o\nlr: 1e-3\nweight_decay: 5E-5\nmin_lr_ratio: 1.0e-2\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.lr, cfg.weight_decay, cfg.min_lr_ratio) == (1e-3, 5e-5, 1e-2)


# ------------------------------------------------------------------ flags that contradict each other
def test_overwrite_only_with_resume_never(tmp_path):
    for resume in ([], ["--resume", "auto"], ["--resume", str(tmp_path / "last.pt")]):
        with pytest.raises(ValueError, match="^--overwrite only applies with --resume never: "):
            parse_config(["--out", "o", "--overwrite", *resume])
    assert parse_config(["--out", "o", "--resume", "never", "--overwrite"]).overwrite
    # The config.json of such a run repeats it; continuing it instead takes --no-overwrite, as the message says.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TrainConfig(out="o", resume="never", overwrite=True).to_dict()))
    assert parse_config(["--config", str(path)]).overwrite
    with pytest.raises(ValueError, match=r"--no-overwrite\) to use --resume auto"):
        parse_config(["--config", str(path), "--resume", "auto"])
    assert parse_config(["--config", str(path), "--resume", "auto", "--no-overwrite"]).resume == "auto"


def test_freeze_trunk_needs_pretrained_weights(tmp_path):
    for model in ("cnn_rnn", "r3d_18"):
        with pytest.raises(ValueError, match="--freeze-trunk without --pretrained .*pass --pretrained .*or drop "
                                             "--freeze-trunk"):
            parse_config(["--out", "o", "--model", model, "--freeze-trunk"])
    with pytest.raises(ValueError, match="--freeze-trunk without --pretrained"):
        parse_config(["--out", "o", "--freeze-trunk", "--pretrained", "none"])
    assert parse_config(["--out", "o", "--freeze-trunk", "--pretrained", "imagenet"]).freeze_trunk
    assert parse_config(["--out", "o", "--freeze-trunk", "--pretrained", str(tmp_path / "w.pth")]).freeze_trunk


# ------------------------------------------------------------------ keys given twice
@pytest.mark.parametrize("suffix, text, message", [
    (".yaml", "out: o\nlr: 0.1\nepochs: 3\nlr: 0.2\n", r": 'lr' is given twice \(line 4\): remove one"),
    (".yml", "out: o\nbatch-size: 4\nbatch_size: 8\n", r"field batch_size is given twice \(as 'batch-size' and "
                                                       r"'batch_size'\)"),
    (".json", '{"out": "o", "epochs": 3, "epochs": 4}', r": 'epochs' is given twice: remove one"),
    (".json", '{"out": "o", "batch_size": 3, "batch-size": 4}', r"field batch_size is given twice"),
    (".toml", 'out = "o"\nepochs = 3\nepochs = 4\n', r"cannot be parsed: Cannot overwrite a value \(at line 3.*"
                                                     r"'epochs = 4'"),
])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, suffix, text, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^--config {re.escape(str(path))}.*{message}"):
        load_config_file(path)


def test_yaml_merge_keys_still_override(tmp_path):
    """``<<`` merges a mapping whose keys the file then overrides: that is no key given twice."""
    path = tmp_path / "c.yaml"
    path.write_text("<<: {lr: 0.1, epochs: 3}\nout: o\nlr: 0.2\n")
    assert load_config_file(path) == {"lr": 0.2, "epochs": 3, "out": "o"}


def test_an_unreadable_config_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"out: \xff\xfe\n")
    with pytest.raises(ValueError, match=f"^--config {re.escape(str(path))} cannot be read: 'utf-8' codec"):
        load_config_file(path)
