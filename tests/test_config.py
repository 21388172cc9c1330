import pytest

from dimba.config import ConfigError, apply_overrides, dump_yaml, load_config, preset_names, validate


def test_presets_load_and_tiny_is_small():
    assert {"tiny", "small", "base"} <= set(preset_names())
    tiny = load_config("tiny")
    assert tiny.model.backbone == "mamba2" and tiny.data.corpus == "shakespeare"
    assert load_config("base").model.d_model > tiny.model.d_model


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", None, ["train.lr=3e-4", "model.backbone=transformer", "sample.top_k=5"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.model.backbone == "transformer" and cfg.sample.top_k == 5


def test_config_file_merges_over_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 3\n")
    cfg = load_config("tiny", f, ["train.max_steps=7"])
    assert cfg.train.batch_size == 3 and cfg.train.max_steps == 7 and cfg.model.d_model == load_config("tiny").model.d_model


def test_the_tiny_preset_drops_the_skip_logits_of_both_latent_families():
    for family in ("continuous", "hybrid"):
        assert not load_config("tiny", None, [f"model.family={family}"]).model.logit_skip
    assert load_config("small", None, ["model.family=hybrid"]).model.logit_skip  # unmeasured at that scale


def test_preset_family_section_applies_under_the_users_settings(tmp_path):
    continuous = load_config("tiny")  # the default family
    assert continuous.train.lr == pytest.approx(2e-3)
    assert (continuous.train.batch_size, continuous.train.max_steps) == (4, 3600)  # more, smaller steps
    ar = load_config("tiny", None, ["model.family=ar"])
    assert ar.train.lr == pytest.approx(4e-3) and (ar.train.batch_size, ar.train.max_steps) == (8, 1800)
    assert load_config("tiny", None, ["model.family=masked"]).train.lr == pytest.approx(4e-3)
    assert load_config("tiny", None, ["model.family=hybrid"]).train.lr == pytest.approx(2e-3)
    assert load_config("tiny", None, ["model.family=continuous", "train.lr=1e-3"]).train.lr == pytest.approx(1e-3)
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  family: ar\n")
    assert load_config("tiny", f).train.lr == pytest.approx(4e-3)
    assert load_config("tiny", f, ["model.family=continuous"]).train.lr == pytest.approx(2e-3)  # overrides win
    f.write_text("train:\n  lr: 5.0e-4\n")
    assert load_config("tiny", f).train.lr == pytest.approx(5e-4)


def test_every_preset_family_section_names_a_family_and_validates():
    from dimba.config import FAMILY_SECTION, preset_dict
    from dimba.families import family_names

    for preset in preset_names():
        for family in preset_dict(preset).get(FAMILY_SECTION, {}):
            assert family in family_names()
            assert load_config(preset, None, [f"model.family={family}"]).model.family == family


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["unknown config key 'train.lrr'", "lr"]),
    ("trian.lr=1", ["unknown config key 'trian'"]),
    ("train.lr=abc", ["train.lr", "valid number"]),
    ("model.d_model=0", ["model.d_model", "greater than 0"]),
    ("model.backbone=lstm", ["model.backbone", "unknown backbone 'lstm'", "mamba2, transformer"]),
    ("train.max_steps=1.5", ["train.max_steps"]),
    ("noequals", ["KEY=VALUE"]),
    ("model.family=[1]", ["model.family", "valid string"]),
])
def test_bad_values_give_one_line_errors(override, words):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", None, [override])
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_inconsistent_sizes_rejected():
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        load_config("tiny", None, ["model.backbone=transformer", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="d_latent"):
        load_config("tiny", None, ["model.latent_diffusion=true"])
    for bad in (["model.prediction_type=x0"], ["model.latent_diffusion=true", "model.d_latent=8"]):
        with pytest.raises(ConfigError, match="onehot_latent=true diffuses one-hot vectors"):
            load_config("tiny", None, ["model.onehot_latent=true", *bad])


def test_a_registered_backbone_is_one_registry_line(monkeypatch):
    """A backbone added to dimba.backbones.MIXERS is accepted by the config, checked by its own rule, offered
    by the CLI and built by DIMBA, with no other file touched."""
    import torch

    from dimba import DIMBA
    from dimba.backbones import MIXERS, BackboneSpec
    from dimba.backbones.transformer import Attention
    from dimba.config import choices
    from dimba.config import ModelConfig

    def check(cfg):
        if cfg.num_heads != 2:
            raise ValueError("attn2 needs model.num_heads=2")

    spec = BackboneSpec(lambda d, bidirectional, **kw: Attention(d, 2, causal=not bidirectional), False, check)
    monkeypatch.setitem(MIXERS, "attn2", spec)
    assert "attn2" in choices(ModelConfig, "backbone")
    cfg = load_config("tiny", None, ["model.backbone=attn2", "model.num_heads=2"])
    with pytest.raises(ConfigError, match="attn2 needs model.num_heads=2"):
        load_config("tiny", None, ["model.backbone=attn2", "model.num_heads=4"])
    model = DIMBA(40, family="masked", backbone="attn2", d_model=16, num_heads=2, num_denoiser_layers=1)
    assert isinstance(model.backbone.blocks[0].mixer, Attention) and model.backbone.blocks[0].mlp is None
    assert model.token_logits(torch.randint(3, 40, (1, 8))).shape == (1, 8, 40)
    assert cfg.model.backbone == "attn2"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("tiny", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("tiny", bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_dump_roundtrip():
    cfg = apply_overrides(load_config("tiny"), ["model.vocab_size=100"])
    import yaml

    assert validate(yaml.safe_load(dump_yaml(cfg))) == cfg
