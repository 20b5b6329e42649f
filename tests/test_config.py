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


# --- --set overrides --------------------------------------------------------------------

from dalle.config import apply_overrides, config_changes, is_architecture_field  # noqa: E402


def test_overrides_parse_to_each_fields_type():
    cfg, done = apply_overrides(get_preset("tiny"), [
        "dvae.codebook_size=1024",         # int
        "train.dvae_lr=3e-4",              # float
        "dvae.straight_through=false",     # bool
        "dvae.quantizer=gumbel",           # Literal
        "dvae.width_multipliers=1,2,2,4",  # tuple[int, ...]
        "train.dvae_steps=1e4",            # an int written as a float
    ])
    assert (cfg.dvae.codebook_size, cfg.train.dvae_lr, cfg.dvae.straight_through) == (1024, 3e-4, False)
    assert (cfg.dvae.quantizer, cfg.dvae.width_multipliers, cfg.train.dvae_steps) == ("gumbel", (1, 2, 2, 4), 10_000)
    assert done["dvae.codebook_size"] == 1024 and len(done) == 6
    assert get_preset("tiny").dvae.codebook_size == 512  # the input is not changed


def test_overrides_carry_copies_of_a_field_into_the_other_components():
    cfg, _ = apply_overrides(get_preset("tiny"), ["dvae.codebook_size=1024", "dvae.num_groups=3",
                                                  "tokenizer.text_len=48"])
    cfg.check()  # the transformer and CLIP follow the dVAE and the tokenizer
    assert (cfg.transformer.image_vocab, cfg.transformer.image_grid, cfg.dvae.width_multipliers) == (1024, 16, (1, 2, 4))
    assert cfg.clip.text_len == cfg.transformer.text_len == 48
    # ... unless the copy is overridden too, and then the contradiction is the user's to see.
    cfg, _ = apply_overrides(get_preset("tiny"), ["dvae.codebook_size=1024", "transformer.image_vocab=512"])
    with pytest.raises(ConfigError, match="image_vocab=512 but dvae.codebook_size=1024"):
        cfg.check()


@pytest.mark.parametrize("text, message", [
    ("dvae.codebok_size=3", "dvae has no field 'codebok_size'; its fields: image_size, channels"),
    ("dave.codebook_size=3", "no section 'dave'; sections: tokenizer, dvae, transformer, clip, train"),
    ("dvae.quantizer=vqvae", "choose one of gumbel, vq"),
    ("train.dvae_steps=1.5", "expected int"),
    ("train.dvae_lr=fast", "expected float"),
    ("dvae.straight_through=maybe", "expected bool"),
    ("dvae.width_multipliers=1,x", "expected comma-separated ints"),
    ("dvae.codebook_size", "--set takes SECTION.KEY=VALUE"),
    ("codebook_size=3", "--set takes SECTION.KEY=VALUE"),
])
def test_bad_overrides_name_the_field_and_the_valid_ones(text, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_preset("tiny"), [text])


def test_a_section_added_later_is_overridable_with_no_change(monkeypatch):
    import dataclasses

    @dataclasses.dataclass
    class DataConfig:
        max_bad_fraction: float = 0.01
        resize: bool = True

    @dataclasses.dataclass
    class Extended(DalleConfig):
        data: DataConfig = dataclasses.field(default_factory=DataConfig)

    cfg, _ = apply_overrides(Extended(), ["data.max_bad_fraction=0.2", "data.resize=no"])
    assert (cfg.data.max_bad_fraction, cfg.data.resize) == (0.2, False)
    assert not is_architecture_field("data", "max_bad_fraction")
    with pytest.raises(ConfigError, match="data has no field 'max_bad'; its fields: max_bad_fraction, resize"):
        apply_overrides(Extended(), ["data.max_bad=1"])


def test_architecture_fields_are_those_of_a_trained_component():
    assert is_architecture_field("dvae", "codebook_size") and is_architecture_field("transformer", "n_layers")
    assert not is_architecture_field("train", "transformer_steps")
    assert not is_architecture_field("transformer", "dropout") and not is_architecture_field("dvae", "kl_weight")
    old = get_preset("tiny")
    new, _ = apply_overrides(old, ["train.clip_lr=1e-4"])
    assert config_changes(old, new) == [("train", "clip_lr", old.train.clip_lr, 1e-4)]


def test_user_presets_tokens_and_sizes():
    for name, size, grid, codes in (("small-64", 64, 16, 1024), ("base-128", 128, 16, 2048), ("base-256", 256, 32, 8192)):
        cfg = get_preset(name)
        assert (cfg.dvae.image_size, cfg.dvae.grid_size, cfg.dvae.codebook_size) == (size, grid, codes), name
    assert get_preset("small-64").dvae.hidden_width == 32


def test_shapes_preset_uses_the_papers_attention_schedule():
    """The bundled model's preset follows figure 11: row, row, column and a convolutional last layer."""
    from dalle.attention_masks import layer_schedule

    t = get_preset("shapes").transformer
    assert t.attention == "sparse"
    assert layer_schedule(t.n_layers, t.attention) == ["row", "row", "column", "conv"]
