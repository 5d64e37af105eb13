"""Configs on disk and the command line."""
import os
import subprocess
import sys

import pytest

from configs import cifar10_ddpm, default, digits, toy2d
from diffax import cli, configuration


def test_save_load_round_trip_keeps_types(tmp_path):
    config = cifar10_ddpm.get_config()
    path = tmp_path / "config.json"
    configuration.save(config, str(path))
    loaded = configuration.load(str(path))
    assert loaded.model.channel_mult == (1, 2, 2, 2)
    assert configuration.to_dict(loaded) == configuration.to_dict(config)
    assert configuration.differences(configuration.to_dict(loaded), configuration.to_dict(config)) == []


def test_differences_ignore_only_resumable_fields():
    a = configuration.to_dict(default.get_config())
    b = default.get_config()
    b.training.num_steps = 5
    b.sampling.steps = 3
    assert configuration.differences(a, configuration.to_dict(b)) == []
    b.optimizer.learning_rate = 1.0
    assert configuration.differences(a, configuration.to_dict(b)) == ["optimizer.learning_rate: 0.002 -> 1.0"]


def test_a_config_of_an_older_diffax_is_brought_up_to_date(tmp_path):
    old = configuration.to_dict(digits.get_config())
    del old["diffusion"]["logit_std"]  # written by a diffax without these fields
    del old["autoencoder"]
    old["model"]["conv_impl"] = "xla"  # and with one since removed
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(old))
    loaded = configuration.load(str(path))
    assert configuration.differences(configuration.to_dict(loaded), configuration.to_dict(digits.get_config())) == []
    old["model"]["conv_impl"] = "rows"  # a removed behaviour cannot be resumed
    path.write_text(__import__("json").dumps(old))
    with pytest.raises(ValueError, match=r"model.conv_impl='rows', which this diffax no longer supports"):
        configuration.load(str(path))


def test_cifar10_config_is_the_ddpm_paper_setup():
    c = cifar10_ddpm.get_config()
    assert (c.model.channels, c.model.channel_mult, c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (c.model.attention_resolutions, c.model.dropout) == ((16,), 0.1)
    assert (c.diffusion.schedule, c.diffusion.num_steps, c.diffusion.prediction) == ("linear", 1000, "eps")
    assert (c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.grad_clip) == (2e-4, 5000, 1.0)
    assert (c.training.batch_size, c.training.ema_decay) == (128, 0.9999)
    with pytest.raises(ValueError, match="variant"):
        cifar10_ddpm.get_config("huge")


def test_config_files_load():
    assert digits.get_config().data.name == "digits"
    assert toy2d.get_config("moons").data.name == "toy2d:moons"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffax", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_unknown_field_names_the_closest(tmp_path):
    r = run_cli("train", "--config", "configs/digits.py", "--config.training.batchsize=3", "--workdir", str(tmp_path))
    assert r.returncode == 2
    assert "config.training.batchsize is not a config field" in r.stderr
    assert "config.training.batch_size" in r.stderr
    assert not (tmp_path / "config.json").exists()  # rejected before anything ran


def test_wrong_type_names_the_field(tmp_path):
    r = run_cli("train", "--config", "configs/digits.py", "--config.training.batch_size=many", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "config.training.batch_size" in r.stderr


def test_help_lists_commands_and_flags():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "--workdir" in r.stdout and "--config" in r.stdout and "--[no]force" in r.stdout


def test_unknown_command_suggests():
    r = run_cli("trian")
    assert r.returncode == 2 and "Did you mean 'train'" in r.stderr


def test_missing_workdir_is_reported():
    r = run_cli("train", "--config", "configs/digits.py")
    assert r.returncode == 2 and "--workdir" in r.stderr


def test_workdir_overrides_are_typed_and_checked():
    base = default.get_config()
    config = configuration.apply_overrides(base, ["--config.training.num_steps=7", "--config.optimizer.learning_rate=1e-4",
                                 "--config.data.random_flip=true", "--config.model.channel_mult=(1,2,4)",
                                 "--config.sampling.sampler=heun"])
    assert config.training.num_steps == 7 and config.optimizer.learning_rate == 1e-4
    assert config.data.random_flip is True and config.model.channel_mult == (1, 2, 4)
    assert config.sampling.sampler == "heun" and base.training.num_steps != 7  # a copy
    with pytest.raises(ValueError, match="type int"):
        configuration.apply_overrides(config, ["--config.training.num_steps=many"])
    with pytest.raises(ValueError, match="true or false"):
        configuration.apply_overrides(config, ["--config.data.random_flip=maybe"])


def test_flow_recipe_with_image_tokens_applies_fluxs_shift_to_training_and_sampling():
    import math

    from configs import flow_matching

    config = flow_matching.rectified_flow(digits.get_config(), image_tokens=1024)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (1024 - 256)  # diffusers' FluxPipeline calculate_shift
    assert config.diffusion.time_shift == pytest.approx(math.exp(mu), rel=1e-6)
    assert config.sampling.shift == config.diffusion.time_shift
    assert flow_matching.rectified_flow(digits.get_config()).diffusion.time_shift == 1.0
