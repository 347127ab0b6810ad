from pathlib import Path

import pytest

from hvdlm.config import JobConfig, load_config
from hvdlm.errors import InputError

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.toml"))


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_file_is_valid(job):
    assert isinstance(load_config(job), JobConfig)


def test_overrides_are_parsed_as_toml_values(tiny_job):
    overrides = ["train.lr=5e-4", "train.max_steps=3", "model.bias=false", "launch.launcher=horovodrun"]
    cfg = load_config(tiny_job, overrides)
    assert cfg.train.lr == 5e-4
    assert cfg.train.max_steps == 3
    assert cfg.model.bias is False
    assert cfg.launch.launcher == "horovodrun"
    assert cfg.model.d_model == 32  # from the file, untouched


def test_integer_is_accepted_where_a_float_is_expected(tiny_job):
    assert load_config(tiny_job, ["train.lr=1"]).train.lr == 1.0


def test_resolved_config_round_trips_through_toml(tiny_job, tmp_path):
    cfg = load_config(tiny_job, ["train.seed=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1e-3", "unknown key 'train.lrr' in --set. Did you mean 'lr'"),
        ("trian.lr=1e-3", r"unknown section '\[trian\]' in --set. Did you mean 'train'"),
        ("train.max_steps=ten", "'train.max_steps' in --set must be int, got 'ten'"),
        ("train.max_steps=true", "'train.max_steps' .* must be int, got True"),
        ("train.max_steps=2.5", "'train.max_steps' .* must be int"),
        ("model.n_head=3", r"model.n_head \(3\) must divide model.d_model \(32\)"),
        ("train.batch_size=0", "'train.batch_size' must be positive"),
        ("launch.launcher=srunn", "'launch.launcher' must be one of mpirun, horovodrun"),
        ("train.lr", "not of the form section.key=value"),
        ("lr=1", "not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(tiny_job, override, expected):
    with pytest.raises(InputError, match=expected):
        load_config(tiny_job, [override])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.compile=on", "parallel.tp=2"], 'train.compile = "on" with parallel.tp > 1 is not supported'),
        (["train.compile=sometimes"], "'train.compile' must be one of auto, on, off"),
        (["train.device=gpu"], "'train.device' must be one of auto, cuda, cpu"),
        (["train.beta2=1.0"], r"'train.beta2' must be in \[0, 1\)"),
        (["model.dropout=-0.1"], r"'model.dropout' must be in \[0, 1\)"),
    ],
)
def test_settings_of_the_gpu_path_and_ranges_are_checked(tiny_job, overrides, expected):
    with pytest.raises(InputError, match=expected):
        load_config(tiny_job, overrides)


def test_missing_job_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_malformed_toml_is_an_input_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[train\nlr = 1\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_config(path)


def test_unknown_key_in_the_file_is_reported_with_the_file(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[model]\nn_layers = 2\n")
    with pytest.raises(InputError, match=r"unknown key 'model.n_layers' in .*typo.toml. Did you mean 'n_layer'"):
        load_config(path)
