"""benchmarks/bench_dvae_grid.py's variants and the BENCHMARKS.md sections built from saved results."""

import importlib.util
import sys
from pathlib import Path

import pytest

from dalle.dvae import DiscreteVAE

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grid = _module("bench_dvae_grid")


@pytest.mark.parametrize("name", sorted(grid.VARIANTS))
def test_each_variant_builds_the_token_grid_and_codebook_its_name_says(name):
    cfg = grid.variant_config(name)
    side, codes, width = name.split("_")[:3]
    assert cfg.dvae.grid_size == int(side[1:]) and cfg.dvae.codebook_size == int(codes[1:])
    assert cfg.dvae.hidden_width == int(width[1:])
    cfg.check()
    DiscreteVAE(cfg.dvae)  # builds


def test_saved_results_render_into_benchmarks_sections():
    writer = _module("write_benchmarks")
    table = grid.table()
    assert table.startswith("| variant | token grid") and "g16_k1024_w32" in table
    section = writer.registry_art_section()
    assert section and section[0].startswith("## Registry art")
    assert any(line.startswith("| dVAE (") for line in section)
    assert "{table}" not in "\n".join(section)
