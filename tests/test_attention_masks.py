"""The transformer's attention masks against brute-force definitions, and the layer schedule."""

from __future__ import annotations

import pytest
import torch

from dalle.attention_masks import MASK_KINDS, build_mask, image_mask, layer_schedule


def conv_keys(jq: int, grid: int, conv_kernel: int) -> set[int]:
    """The raster indices the causal conv kernel of token ``jq`` covers, one kernel cell at a time.

    Cell ``(dr, dc)`` of the kernel's causal half (rows above and the token's own row up to
    itself) is the key at raster index ``jq + dr * grid + dc``: the kernel is laid out in raster
    order, so it wraps round the row edges as the row window does (figure 11(d)).
    """
    h = conv_kernel // 2
    keys = set()
    for dr in range(-h, 1):
        for dc in range(-h, h + 1):
            if dr == 0 and dc > 0:
                continue  # the causal half: nothing right of the token in its own row
            jk = jq + dr * grid + dc
            if 0 <= jk <= jq:
                keys.add(jk)
    return keys


def brute_force_mask(kind: str, text_len: int, grid: int, conv_kernel: int) -> torch.Tensor:
    """The mask written straight from the definitions, one (query, key) pair at a time."""
    s = text_len + grid * grid
    mask = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        for k in range(s):
            if k > q:
                continue  # nothing attends to the future
            if q < text_len:
                mask[q, k] = True  # text: causal over text
            elif k < text_len:
                mask[q, k] = True  # image sees all text
            else:
                jq, jk = q - text_len, k - text_len
                (rq, cq), (rk, ck) = divmod(jq, grid), divmod(jk, grid)
                if kind == "full":
                    ok = True
                elif kind == "row":
                    ok = jq - jk <= grid  # the previous `grid` tokens in raster order and itself
                elif kind == "column":
                    ok = ck == cq
                elif kind == "conv":
                    ok = jk in conv_keys(jq, grid, conv_kernel)
                mask[q, k] = ok
    return mask


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("text_len,grid,conv_kernel",
                         [(3, 4, 3), (5, 3, 3), (2, 5, 5), (1, 4, 11), (4, 6, 3), (2, 8, 3), (1, 12, 5), (2, 7, 7)])
def test_masks_match_brute_force(kind, text_len, grid, conv_kernel):
    built = build_mask(kind, text_len, grid, conv_kernel)
    assert built.dtype == torch.bool and built.shape == (text_len + grid**2,) * 2
    assert torch.equal(built, brute_force_mask(kind, text_len, grid, conv_kernel))


def test_row_mask_on_4x4_grid_is_figure_11a():
    m = image_mask("row", 4)
    # "each image token attends to the previous 5 image tokens in raster order ... the last token
    # being attended to is the one in the same column of the previous row": itself and 4 before it.
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # (1, 0): all of row 0 and itself
    assert m[15].nonzero().flatten().tolist() == [11, 12, 13, 14, 15]  # (3, 3) down to (2, 3)
    assert m.sum(1).tolist() == [1, 2, 3, 4] + [5] * 12


def test_column_and_conv_masks_on_4x4_grid():
    col = image_mask("column", 4)
    assert col[13].nonzero().flatten().tolist() == [1, 5, 9, 13]  # (3, 1): its column so far
    conv = image_mask("conv", 4, conv_kernel=3)
    # (2, 2) = index 10, inside the grid: (1,1) (1,2) (1,3) (2,1) (2,2), the causal half of 3x3.
    assert conv[10].nonzero().flatten().tolist() == [5, 6, 7, 9, 10]
    # (2, 0) = index 8 on the left edge: its left neighbour wraps to (1, 3) and its upper-left
    # one to (0, 3), as the row window wraps (figure 11(d) "with wraparound behavior").
    assert conv[8].nonzero().flatten().tolist() == [3, 4, 5, 7, 8]
    # (1, 3) = index 7 on the right edge: its upper-right neighbour wraps to (1, 0).
    assert conv[7].nonzero().flatten().tolist() == [2, 3, 4, 6, 7]


def test_conv_mask_is_the_same_set_of_raster_distances_for_every_token():
    # "similar to the row attention": no window is clipped at the image edges; past the first
    # h rows every token sees the same raster distances, h * (2h + 1) + h + 1 of them.
    grid, kernel = 9, 5
    h = kernel // 2
    m = image_mask("conv", grid, kernel)
    start = h * grid + h
    distances = {tuple((j - m[j].nonzero().flatten()).tolist()) for j in range(start, grid * grid)}
    assert len(distances) == 1
    (d,) = distances
    assert len(d) == h * (2 * h + 1) + h + 1
    assert sorted(d) == [0, 1, 2] + list(range(grid - 2, grid + 3)) + list(range(2 * grid - 2, 2 * grid + 3))


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_the_cached_samplers_key_lists_are_the_definition(kind):
    from dalle.attention_masks import allowed_keys

    text_len, grid, kernel = 3, 6, 3
    reference = brute_force_mask(kind, text_len, grid, kernel)
    keys = allowed_keys(kind, text_len, grid, kernel)
    assert [k.tolist() for k in keys] == [row.nonzero().flatten().tolist() for row in reference]


def test_every_position_sees_itself_and_nothing_later():
    for kind in MASK_KINDS:
        m = build_mask(kind, 4, 5, 3)
        assert m.diagonal().all()
        assert not m.triu(1).any()


def test_masks_are_cached():
    assert build_mask("conv", 3, 4, 3) is build_mask("conv", 3, 4, 3)
    assert build_mask("row", 3, 4, 3) is build_mask("row", 3, 4, 7)  # the kernel does not matter for rows


def test_paper_schedule():
    assert layer_schedule(8) == ["row", "row", "column", "row", "row", "row", "column", "conv"]
    kinds = layer_schedule(64)
    assert kinds[-1] == "conv"
    assert [i for i, k in enumerate(kinds) if k == "column"] == list(range(2, 63, 4))
    assert kinds.count("row") == 64 - 1 - 16
    assert layer_schedule(1) == ["conv"]
    assert layer_schedule(5, "full") == ["full"] * 5


@pytest.mark.parametrize("call,match", [
    (lambda: build_mask("diagonal", 3, 4), "unknown mask kind"),
    (lambda: build_mask("conv", 3, 4, 4), "odd"),
    (lambda: build_mask("row", 0, 4), "positive"),
    (lambda: layer_schedule(4, "sparse_ish"), "attention must be"),
    (lambda: layer_schedule(0), "at least 1"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- FlexAttention masks: the same pattern, and block masks that skip the empty tiles ----------

flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="this PyTorch has no FlexAttention")


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("text_len,grid,conv_kernel", [(3, 4, 3), (5, 6, 5), (1, 5, 3)])
def test_flex_mask_mod_is_the_boolean_mask(kind, text_len, grid, conv_kernel):
    from dalle.attention_masks import column_major_order, mask_mod

    length = text_len + grid * grid - 1  # the transformer is fed all but the last image token
    reference = brute_force_mask(kind, text_len, grid, conv_kernel)[:length, :length]
    dense = flex.create_mask(mask_mod(kind, text_len, grid, conv_kernel), None, None, length, length, device="cpu")
    assert torch.equal(dense[0, 0], reference)
    # In column-major order the same pairs attend: the mask is the reordered boolean mask.
    order = column_major_order(text_len, grid, length)
    reordered = flex.create_mask(mask_mod(kind, text_len, grid, conv_kernel, order), None, None, length, length,
                                 device="cpu")
    assert torch.equal(reordered[0, 0], reference[order][:, order])


def test_column_major_order_puts_each_column_together():
    from dalle.attention_masks import column_major_order

    order = column_major_order(2, 3, 2 + 9 - 1)  # 2 text, 3x3 grid, the last image token absent
    assert order.tolist() == [0, 1, 2, 5, 8, 3, 6, 9, 4, 7]
    assert sorted(order.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="length"):
        column_major_order(2, 3, 12)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_block_masks_compute_only_tiles_holding_allowed_pairs(kind):
    from dalle.attention_masks import column_major_order, flex_mask

    text_len, grid, kernel, block = 8, 12, 5, 16
    length = text_len + grid * grid - 1
    fm = flex_mask(kind, text_len, grid, kernel, length, "cpu", block_size=block)
    mask = build_mask(kind, text_len, grid, kernel)[:length, :length]
    if kind == "column":
        assert fm.order is not None and torch.equal(fm.order[fm.inverse], torch.arange(length))
        mask = mask[fm.order][:, fm.order]
        assert torch.equal(fm.order, column_major_order(text_len, grid, length))
    tiles = -(-length // block)
    padded = torch.zeros(tiles * block, tiles * block, dtype=torch.bool)
    padded[:length, :length] = mask
    expected = padded.view(tiles, block, tiles, block).any(dim=3).any(dim=1)
    assert torch.equal(fm.block_mask.to_dense()[0, 0].bool(), expected)
    assert fm is flex_mask(kind, text_len, grid, kernel, length, "cpu", block_size=block)  # cached


def test_sparse_layers_skip_most_tiles_at_the_paper_layout():
    from dalle.attention_masks import tile_fraction

    # Dense masked attention computes every tile (1.0), causal attention about half.
    assert 0.5 < tile_fraction("full", 256, 32) < 0.6
    assert tile_fraction("row", 256, 32) < 0.36
    assert tile_fraction("column", 256, 32) < 0.3  # thanks to the column-major order
    assert tile_fraction("conv", 256, 32, 11) < 0.42


@pytest.mark.parametrize("text_len,grid", [(3, 4), (5, 6), (1, 5), (8, 12)])
def test_column_major_mask_mod_needs_no_lookup_table(text_len, grid):
    from dalle.attention_masks import column_major_order, mask_mod

    for length in (text_len + grid * grid - 1, text_len + grid * grid):  # training/scoring, and the whole stream
        order = column_major_order(text_len, grid, length)
        reference = build_mask("column", text_len, grid, 3)[:length, :length][order][:, order]
        arithmetic = flex.create_mask(mask_mod("column", text_len, grid, column_major=True), None, None, length,
                                      length, device="cpu")
        assert torch.equal(arithmetic[0, 0], reference)
    with pytest.raises(ValueError, match="column_major"):
        mask_mod("row", text_len, grid, column_major=True)


def test_column_block_mask_of_a_shorter_stream_keeps_the_lookup_table():
    from dalle.attention_masks import column_major_order, flex_mask

    text_len, grid = 4, 6
    length = text_len + 20  # a partial image: the last columns are short, no arithmetic mapping
    fm = flex_mask("column", text_len, grid, 3, length, "cpu", block_size=16)
    order = column_major_order(text_len, grid, length)
    expected = build_mask("column", text_len, grid, 3)[:length, :length][order][:, order]
    got = flex.create_mask(fm.block_mask.mask_mod, None, None, length, length, device="cpu")[0, 0]
    assert torch.equal(got, expected)


def test_smaller_and_rectangular_tiles_skip_more_work():
    from dalle.attention_masks import tile_fraction

    for kind in ("row", "column", "conv"):
        square = tile_fraction(kind, 256, 32, 11, 128)
        assert tile_fraction(kind, 256, 32, 11, 64) < square
        assert tile_fraction(kind, 256, 32, 11, 64) <= tile_fraction(kind, 256, 32, 11, (128, 64)) <= square
    with pytest.raises(ValueError, match="power of two"):
        tile_fraction("row", 256, 32, 11, 96)


# --- FlexAttention kernel options: what the tuning table may hold ------------------------------

ALL_TILES_32 = {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32, "fwd_num_warps": 4, "fwd_num_stages": 2,
                "bwd_BLOCK_M1": 16, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 16,
                "bwd_num_warps": 4, "bwd_num_stages": 2}


def test_valid_kernel_options_pass_the_check():
    from dalle.attention_masks import check_kernel_options

    check_kernel_options({}, 128)  # PyTorch's defaults
    check_kernel_options({"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128,
                          "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "num_warps": 8, "fwd_USE_TMA": True}, 128)
    check_kernel_options(ALL_TILES_32, 32)
    check_kernel_options({**ALL_TILES_32, "fwd_BLOCK_M": 64, "bwd_BLOCK_M2": 64}, (64, 32))  # query tiles up to 64


@pytest.mark.parametrize("options,block,match", [
    ({"fwd_BLOCK_Q": 64}, 128, "not a FlexAttention kernel option"),
    ({"PRESCALE_QK": True}, 128, "change the results"),
    ({"bwd_ROWS_GUARANTEED_SAFE": True}, 128, "change the results"),
    ({"BLOCKS_ARE_CONTIGUOUS": True}, 128, "change the results"),
    ({"fwd_BLOCK_M": 256}, 128, "dividing the mask's query block 128"),
    ({"fwd_BLOCK_N": 48}, 128, "power of two"),
    ({**ALL_TILES_32, "fwd_BLOCK_N": 64}, (64, 32), "dividing the mask's key block 32"),
    ({"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 32}, 128, "BLOCK_N1=32 must be a multiple of BLOCK_M1=64"),
    ({"bwd_BLOCK_M2": 32, "bwd_BLOCK_N2": 64}, 128, "BLOCK_M2=32 must be a multiple of BLOCK_N2=64"),
    ({"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}, 64, "needs explicit bwd_BLOCK_M1"),
    ({"fwd_num_warps": 0}, 128, "positive int"),
])
def test_unsafe_or_impossible_kernel_options_fail_loudly(options, block, match):
    from dalle.attention_masks import check_kernel_options

    with pytest.raises(ValueError, match=match):
        check_kernel_options(options, block)


def test_the_checked_in_tuning_table_is_valid():
    from dalle.attention_masks import FLEX_TUNING, check_kernel_options

    for device, kinds in FLEX_TUNING.items():
        assert device == "cpu" or device.startswith("sm"), device
        for kind, entry in kinds.items():
            assert kind in ("row", "column", "conv"), kind
            assert set(entry) <= {"block_size", "kernel_options"}, entry
            check_kernel_options(entry.get("kernel_options") or {}, entry.get("block_size", 128))


def test_flex_mask_takes_the_tuned_block_size_and_options_for_its_device(monkeypatch):
    from dalle import attention_masks
    from dalle.attention_masks import flex_mask

    text_len, grid, length = 8, 12, 8 + 144 - 1
    monkeypatch.setattr(attention_masks, "FLEX_TUNING", {
        "cpu": {"row": {"block_size": 32, "kernel_options": ALL_TILES_32}},
        "sm90": {"conv": {"block_size": 64, "kernel_options": {}}},
    })
    tuned = flex_mask("row", text_len, grid, 3, length, "cpu")
    assert tuned.block_mask.BLOCK_SIZE == (32, 32) and tuned.kernel_options == ALL_TILES_32
    assert tuned is flex_mask("row", text_len, grid, 3, length, "cpu")  # cached with its options
    explicit = flex_mask("row", text_len, grid, 3, length, "cpu", block_size=32)
    assert explicit.kernel_options is None  # an explicit tile means PyTorch's default options
    assert explicit.block_mask is tuned.block_mask  # one block mask per tile, whatever the options
    untuned = flex_mask("conv", text_len, grid, 3, length, "cpu")  # tuned on sm90 only
    assert untuned.block_mask.BLOCK_SIZE == (128, 128) and untuned.kernel_options is None


def test_options_this_pytorch_lacks_are_dropped_with_a_warning(monkeypatch):
    from dalle import attention_masks
    from dalle.attention_masks import flex_tuning

    monkeypatch.setattr(attention_masks, "FLEX_TUNING", {
        "cpu": {"column": {"block_size": [32, 16], "kernel_options": {"fwd_num_warps": 4, "fwd_FUTURE_KNOB": 1}}}})
    with pytest.warns(UserWarning, match="FUTURE_KNOB"):
        block, options = flex_tuning("column", "cpu")
    assert block == (32, 16) and options == {"fwd_num_warps": 4}
