import pytest

from dalle.config import PRESETS, ConfigError, DalleConfig, config_from_dict, config_to_dict, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent_and_round_trip(name):
    cfg = get_preset(name)
    cfg.check()
    assert config_from_dict(DalleConfig, config_to_dict(cfg)) == cfg


def test_paper_preset_matches_the_paper():
    t = get_preset("paper").transformer
    assert (t.n_layers, t.n_heads, t.head_dim, t.d_model) == (64, 62, 64, 3968)
    assert (t.text_len, t.image_grid, t.image_vocab, t.seq_len) == (256, 32, 8192, 1280)
    assert get_preset("paper").dvae.grid_size == 32


def test_inconsistent_config_is_explained():
    cfg = get_preset("shapes")
    cfg.transformer.image_vocab = 1000
    with pytest.raises(ConfigError, match="image_vocab=1000 but dvae.codebook_size"):
        cfg.check()


def test_bad_fields_are_named():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match=r"transformer.n_layers: expected a number"):
        config_from_dict(DalleConfig, {"transformer": {"n_layers": "four"}})
