"""Config parser: every key's range, every default, every cross-key rule and the line-reading rules of docs/spec.md."""

from __future__ import annotations

import logging
import re

import pytest
from helpers import INVALID
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqlite.config import QuantConfig, load_config, parse_config
from ptqlite.errors import ConfigError

SRC = "q.cfg"
WEIGHT = "[common_quant_param]\nquant_type=WEIGHT_QUANT\n"  # lines 1-2
CALIB = "calibrate_path=x:calib\ncalibrate_size=10\ninput_type=IMAGE\n"


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    message = str(info.value)
    assert "\n" not in message, "errors are one line"
    return message


def with_section(section: str, head: str = WEIGHT) -> str:
    return head if section == "common_quant_param" else head + f"[{section}]\n"


# ---------------------------------------------------------------- one invalid value per key (helpers.INVALID)

ALL_KEYS = {
    "common_quant_param": {"quant_type", "bit_num", "min_quant_weight_size", "min_quant_weight_channel",
                           "skip_quant_node", "debug_info_save_path", "enable_encode", "skip_quant_op_type"},
    "mixed_bit_weight_quant_param": {"init_scale", "auto_tune"},
    "weight_quant_param": {"per_channel", "bias_correction", "dequant_strategy", "block_size",
                           "gather_min_bit_num", "activation_weighted"},
    "full_quant_param": {"activation_quant_method", "bias_correction", "per_channel", "target_device"},
    "data_preprocess_param": {"calibrate_path", "calibrate_size", "input_type", "image_to_format", "normalize_mean",
                              "normalize_std", "resize_width", "resize_height", "resize_method",
                              "center_crop_width", "center_crop_height"},
    "dynamic_quant_param": {"quant_strategy"},
}


def test_every_key_has_an_invalid_value_case():
    covered = {(section, key) for section, key, _, _ in INVALID}
    covered.add(("common_quant_param", "debug_info_save_path"))  # needs a real file: its own test below
    assert covered == {(s, k) for s, keys in ALL_KEYS.items() for k in keys}


@pytest.mark.parametrize("section, key, value, expected", INVALID, ids=[f"{k}={v}" for _, k, v, _ in INVALID])
def test_invalid_value_names_file_line_section_key_value_and_range(section, key, value, expected):
    if key == "quant_type":
        text, line = f"[common_quant_param]\n# a comment\nquant_type={value}\n", 3
    else:
        text = with_section(section)
        line = text.count("\n") + 1
        text += f"{key}={value}\n"
    assert error(text) == f"{SRC}:{line}: [{section}] {key}={value}: {expected}"


def test_debug_info_save_path_must_not_be_a_file(tmp_path):
    existing = tmp_path / "report.txt"
    existing.write_text("x")
    message = error(WEIGHT + f"debug_info_save_path={existing}\n")
    assert message == (f"{SRC}:3: [common_quant_param] debug_info_save_path={existing}: "
                       "expected a directory path, not an existing file")
    # A directory that exists, or one that does not exist yet, is fine.
    assert parse_config(WEIGHT + f"debug_info_save_path={tmp_path}\n").common.debug_info_save_path == str(tmp_path)
    missing = tmp_path / "new" / "dir"
    assert parse_config(WEIGHT + f"debug_info_save_path={missing}\n").common.debug_info_save_path == str(missing)


INT_KEYS = [
    ("common_quant_param", "bit_num", 0, 16),
    ("common_quant_param", "min_quant_weight_size", 0, 65535),
    ("common_quant_param", "min_quant_weight_channel", 0, 65535),
    ("data_preprocess_param", "calibrate_size", 1, 65535),
    ("data_preprocess_param", "resize_width", 1, 65535),
    ("data_preprocess_param", "resize_height", 1, 65535),
    ("data_preprocess_param", "center_crop_width", 1, 65535),
    ("data_preprocess_param", "center_crop_height", 1, 65535),
]


@pytest.mark.parametrize("section, key, lo, hi", INT_KEYS, ids=[k for _, k, _, _ in INT_KEYS])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_integer_outside_the_range_is_rejected_with_the_range(section, key, lo, hi, data):
    value = data.draw(st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1)))
    text = with_section(section)
    line = text.count("\n") + 1
    assert error(text + f"{key}={value}\n") == f"{SRC}:{line}: [{section}] {key}={value}: expected an integer in [{lo}, {hi}]"


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(0, 16), size=st.integers(0, 65535), channel=st.integers(0, 65535))
def test_any_integer_inside_the_range_is_kept(bits, size, channel):
    config = parse_config(WEIGHT + f"bit_num={bits}\nmin_quant_weight_size={size}\nmin_quant_weight_channel={channel}\n")
    assert (config.common.bit_num, config.common.min_quant_weight_size, config.common.min_quant_weight_channel) == (
        bits, size, channel)
    assert config.is_mixed_bit == (bits == 0)


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.floats(0.0, 1.0, exclude_min=True,
                                                                                        exclude_max=True)))
def test_init_scale_open_interval(value):
    text = WEIGHT + f"[mixed_bit_weight_quant_param]\ninit_scale={value!r}\n"
    if 0.0 < value < 1.0:
        assert parse_config(text).mixed_bit.init_scale == value
    else:
        assert error(text) == f"{SRC}:4: [mixed_bit_weight_quant_param] init_scale={value!r}: expected a number in (0, 1)"


@settings(max_examples=30, deadline=None)
@given(word=st.sampled_from(["true", "false"]), mask=st.lists(st.booleans(), min_size=5, max_size=5))
def test_booleans_are_case_insensitive(word, mask):
    spelled = "".join(c.upper() if up else c for c, up in zip(word, mask))
    config = parse_config(WEIGHT + f"[weight_quant_param]\nper_channel={spelled}\n[mixed_bit_weight_quant_param]\n"
                          f"auto_tune={spelled}\n")
    assert config.weight.per_channel is (word == "true")
    assert config.mixed_bit.auto_tune is (word == "true")


# ---------------------------------------------------------------- defaults


def test_defaults_of_every_key():
    config = parse_config(WEIGHT, SRC)
    c = config.common
    assert (c.quant_type, c.bit_num, c.min_quant_weight_size, c.min_quant_weight_channel) == ("WEIGHT_QUANT", 8, 0, 16)
    assert (c.skip_quant_node, c.debug_info_save_path, c.enable_encode) == ((), "", True)
    assert (config.mixed_bit.init_scale, config.mixed_bit.auto_tune) == (0.02, False)
    w = config.weight
    assert (w.per_channel, w.bias_correction, w.dequant_strategy, w.block_size) == (True, True, "DEFAULT", 0)
    assert (w.gather_min_bit_num, w.activation_weighted) == (6, True)
    f = config.full
    assert (f.activation_quant_method, f.bias_correction, f.per_channel, f.target_device) == (
        "MAX_MIN", True, True, "CPU")
    d = config.data
    assert (d.calibrate_path, d.calibrate_size, d.input_type, d.image_to_format) == ((), 0, "", "")
    assert (d.normalize_mean, d.normalize_std) == ((), ())
    assert (d.resize_width, d.resize_height, d.resize_method, d.center_crop_width, d.center_crop_height) == (
        0, 0, "", 0, 0)
    assert config.dynamic.quant_strategy == "ALWC"
    assert (config.ascend_context, config.sections, config.source) == ((), ("common_quant_param",), SRC)
    assert (config.quant_type, config.is_mixed_bit) == ("WEIGHT_QUANT", False)


def test_empty_value_means_not_given():
    config = parse_config(WEIGHT + "bit_num=\nskip_quant_node=\n[full_quant_param]\ntarget_device=\n")
    assert (config.common.bit_num, config.common.skip_quant_node, config.full.target_device) == (8, (), "CPU")
    # The empty entry is still the first one: a later duplicate does not replace it.
    assert parse_config(WEIGHT + "bit_num=\nbit_num=4\n").common.bit_num == 8
    # An empty quant_type is a missing quant_type.
    assert error("[common_quant_param]\nquant_type=\n") == (
        f"{SRC}:2: [common_quant_param] quant_type: required; expected one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT")


def test_quant_type_is_required():
    assert error("[common_quant_param]\nbit_num=8\n") == (
        f"{SRC}:1: [common_quant_param] quant_type: required; expected one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT")
    assert error("[weight_quant_param]\nper_channel=true\n") == (
        f"{SRC}: [common_quant_param] quant_type: required; expected one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT")


# ---------------------------------------------------------------- cross-key rules

FULL = "[common_quant_param]\nquant_type=FULL_QUANT\n"


@pytest.mark.parametrize("quant_type", ["FULL_QUANT", "DYNAMIC_QUANT"])
@pytest.mark.parametrize("bits", [0, 4, 16])
def test_full_and_dynamic_need_bit_num_8(quant_type, bits):
    text = f"[common_quant_param]\nquant_type={quant_type}\nbit_num={bits}\n[data_preprocess_param]\n{CALIB}"
    assert error(text) == f"{SRC}:3: [common_quant_param] bit_num={bits}: expected 8 for quant_type={quant_type}"
    assert parse_config(text.replace(f"bit_num={bits}", "bit_num=8")).common.bit_num == 8


@pytest.mark.parametrize("bits", [0, 1, 4, 7, 9, 15])
def test_enable_encode_false_needs_8_or_16_bits(bits):
    assert error(WEIGHT + f"bit_num={bits}\nenable_encode=false\n") == (
        f"{SRC}:4: [common_quant_param] enable_encode=false: expected true when bit_num is not 8 or 16 "
        f"(bit_num={bits}): only 8 and 16 bits have a plain integer storage")


@pytest.mark.parametrize("bits", [8, 16])
def test_enable_encode_false_with_8_or_16_bits(bits):
    assert parse_config(WEIGHT + f"bit_num={bits}\nenable_encode=FALSE\n").common.enable_encode is False


@pytest.mark.parametrize("missing", ["calibrate_path", "calibrate_size", "input_type"])
def test_full_quant_requires_calibration_keys(missing):
    body = "".join(line + "\n" for line in CALIB.splitlines() if not line.startswith(missing))
    assert error(FULL + "[data_preprocess_param]\n" + body) == (
        f"{SRC}:3: [data_preprocess_param] {missing}: required for quant_type=FULL_QUANT")


def test_full_quant_without_data_section_points_at_quant_type():
    assert error(FULL) == f"{SRC}:2: [data_preprocess_param] calibrate_path: required for quant_type=FULL_QUANT"


def test_full_quant_minimal_config():
    config = parse_config(FULL + "[data_preprocess_param]\n" + CALIB)
    assert config.data.calibrate_path == (("x", "calib"),)
    assert (config.data.calibrate_size, config.data.input_type) == (10, "IMAGE")


@pytest.mark.parametrize("missing", ["calibrate_size", "input_type"])
def test_calibrate_path_needs_size_and_type(missing):
    body = "".join(line + "\n" for line in CALIB.splitlines() if not line.startswith(missing))
    assert error(WEIGHT + "[data_preprocess_param]\n" + body) == (
        f"{SRC}:3: [data_preprocess_param] {missing}: required when calibrate_path is given")


def test_calibrate_path_names_each_input_once():
    assert error(WEIGHT + "[data_preprocess_param]\ncalibrate_path=a:/x,a:/y\ncalibrate_size=1\ninput_type=BIN\n") == (
        f"{SRC}:4: [data_preprocess_param] calibrate_path=a:/x,a:/y: expected each input name at most once")


RESIZE = {"resize_width": "224", "resize_height": "160", "resize_method": "LINEAR"}


@pytest.mark.parametrize("missing", list(RESIZE))
def test_resize_keys_go_together(missing):
    body = "".join(f"{k}={v}\n" for k, v in RESIZE.items() if k != missing)
    assert error(WEIGHT + "[data_preprocess_param]\n" + body) == (
        f"{SRC}:3: [data_preprocess_param] {missing}: required when resizing (resize_width, resize_height and "
        "resize_method go together)")
    config = parse_config(WEIGHT + "[data_preprocess_param]\n" + "".join(f"{k}={v}\n" for k, v in RESIZE.items()))
    assert (config.data.resize_width, config.data.resize_height, config.data.resize_method) == (224, 160, "LINEAR")


@pytest.mark.parametrize("given_key, missing", [("center_crop_width", "center_crop_height"),
                                                ("center_crop_height", "center_crop_width")])
def test_crop_keys_go_together(given_key, missing):
    assert error(WEIGHT + f"[data_preprocess_param]\n{given_key}=32\n") == (
        f"{SRC}:3: [data_preprocess_param] {missing}: required when the other center_crop key is given")
    config = parse_config(WEIGHT + "[data_preprocess_param]\ncenter_crop_width=32\ncenter_crop_height=24\n")
    assert (config.data.center_crop_width, config.data.center_crop_height) == (32, 24)


@pytest.mark.parametrize("given_key, missing", [("normalize_mean", "normalize_std"),
                                                ("normalize_std", "normalize_mean")])
def test_normalize_keys_go_together(given_key, missing):
    assert error(WEIGHT + f"[data_preprocess_param]\n{given_key}=[1, 2, 3]\n") == (
        f"{SRC}:3: [data_preprocess_param] {missing}: required when the other normalize key is given")


@pytest.mark.parametrize("fmt, mean, std, bad_key, channels, shown", [
    ("GRAY", "[1, 2, 3]", "[1, 1, 1]", "normalize_mean", 1, "GRAY"),
    ("GRAY", "[1]", "[1, 1, 1]", "normalize_std", 1, "GRAY"),
    ("RGB", "[127.5]", "[127.5]", "normalize_mean", 3, "RGB"),
    ("BGR", "[1, 2, 3]", "[2]", "normalize_std", 3, "BGR"),
    ("", "[1]", "[1]", "normalize_mean", 3, "BGR (the default)"),
])
def test_normalize_length_follows_image_to_format(fmt, mean, std, bad_key, channels, shown):
    fmt_line = f"image_to_format={fmt}\n" if fmt else ""
    text = WEIGHT + f"[data_preprocess_param]\n{fmt_line}normalize_mean={mean}\nnormalize_std={std}\n"
    line = 4 + bool(fmt) + (bad_key == "normalize_std")
    value = mean if bad_key == "normalize_mean" else std
    assert error(text) == (f"{SRC}:{line}: [data_preprocess_param] {bad_key}={value}: expected {channels} value(s), "
                           f"one per channel of image_to_format={shown}")


def test_normalize_values_kept():
    gray = parse_config(WEIGHT + "[data_preprocess_param]\nimage_to_format=GRAY\nnormalize_mean=[0.5]\n"
                        "normalize_std=[-2e-1]\n").data
    assert (gray.normalize_mean, gray.normalize_std) == ((0.5,), (-0.2,))
    rgb = parse_config(WEIGHT + "[data_preprocess_param]\nnormalize_mean=[ 127.5 ,127.5, 1E2 ]\n"
                       "normalize_std=[127.5, +1, .5]\n").data
    assert (rgb.normalize_mean, rgb.normalize_std) == ((127.5, 127.5, 100.0), (127.5, 1.0, 0.5))


def test_normalize_std_not_zero():
    text = WEIGHT + "[data_preprocess_param]\nnormalize_mean=[1, 2, 3]\nnormalize_std=[1, 0.0, 1]\n"
    assert error(text) == (f"{SRC}:5: [data_preprocess_param] normalize_std=[1, 0.0, 1]: expected non-zero values "
                           "(they divide the image)")


def test_on_the_fly_needs_fixed_bits():
    text = WEIGHT + "bit_num=0\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\n"
    assert error(text) == (f"{SRC}:5: [weight_quant_param] dequant_strategy=ON_THE_FLY: expected a fixed bit_num in "
                           "[1, 16] with ON_THE_FLY, not mixed bit (bit_num=0)")
    fixed = parse_config(text.replace("bit_num=0", "bit_num=4"))
    assert (fixed.weight.dequant_strategy, fixed.is_mixed_bit) == ("ON_THE_FLY", False)


@pytest.mark.parametrize("value", ["0", "16", "32", "64", "128", "256", "+32"])
def test_block_size_accepts_zero_and_powers_of_two(value):
    text = WEIGHT + "bit_num=4\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\nblock_size=" + value + "\n"
    assert parse_config(text, SRC).weight.block_size == int(value)


def test_block_size_needs_a_fixed_bit_num_and_per_channel():
    # the default strategy stores block-wise codes packed (any fixed bit_num)
    for bits in (1, 4, 8, 16):
        parsed = parse_config(WEIGHT + f"bit_num={bits}\n[weight_quant_param]\nblock_size=32\n", SRC).weight
        assert (parsed.block_size, parsed.dequant_strategy) == (32, "DEFAULT")
    text = WEIGHT + "bit_num=0\n[weight_quant_param]\nblock_size=32\n"
    assert error(text) == (f"{SRC}:5: [weight_quant_param] block_size=32: expected 0 with mixed bit (bit_num=0): "
                           "block-wise scales need a fixed bit_num in [1, 16]")
    text = WEIGHT + "bit_num=4\n[weight_quant_param]\nper_channel=false\nblock_size=32\n"
    assert error(text) == (f"{SRC}:6: [weight_quant_param] block_size=32: expected 0 with per_channel=false "
                           "(blocks split output channels)")
    text = WEIGHT + "bit_num=4\n[weight_quant_param]\nper_channel=false\ndequant_strategy=ON_THE_FLY\nblock_size=32\n"
    assert error(text) == (f"{SRC}:7: [weight_quant_param] block_size=32: expected 0 with per_channel=false "
                           "(blocks split output channels)")
    # block_size=0 is today's per-channel scheme, valid with any strategy
    assert parse_config(WEIGHT + "[weight_quant_param]\nblock_size=0\n", SRC).weight.block_size == 0
    # mixed bit with ON_THE_FLY is refused on dequant_strategy first (its own rule)
    text = WEIGHT + "bit_num=0\n[weight_quant_param]\ndequant_strategy=ON_THE_FLY\nblock_size=32\n"
    assert "expected a fixed bit_num in [1, 16] with ON_THE_FLY" in error(text)


def test_image_keys_with_bin_input_warn(caplog):
    text = WEIGHT + "[data_preprocess_param]\ncalibrate_path=in:d\ncalibrate_size=2\ninput_type=BIN\nresize_width=8\n" \
        "resize_height=8\nresize_method=NEAREST\n"
    with caplog.at_level(logging.WARNING, logger="ptqlite.config"):
        config = parse_config(text, SRC)
    assert config.data.input_type == "BIN"
    assert f"{SRC}: [data_preprocess_param] resize_width is ignored with input_type=BIN" in caplog.text


# ---------------------------------------------------------------- reading rules


def test_comments_short_lines_whitespace_and_crlf():
    text = ("# leading comment\r\n\r\nab\r\n  [common_quant_param]  \r\n   # indented comment\r\n"
            "  quant_type =  WEIGHT_QUANT \r\nbit_num\t=\t4\r\nxy\r\n")
    config = parse_config(text)
    assert (config.quant_type, config.common.bit_num) == ("WEIGHT_QUANT", 4)


def test_inline_comment_is_part_of_the_value():
    assert error(WEIGHT + "bit_num=4 # four bits\n") == (
        f"{SRC}:3: [common_quant_param] bit_num=4 # four bits: expected an integer in [0, 16]")


def test_value_splits_at_the_first_equals_sign():
    config = parse_config(WEIGHT + "skip_quant_node=a=b, c\n")
    assert config.common.skip_quant_node == ("a=b", "c")


def test_first_duplicate_wins(caplog):
    with caplog.at_level(logging.WARNING, logger="ptqlite.config"):
        config = parse_config(WEIGHT + "bit_num=4\nbit_num=not-even-checked\n", SRC)
    assert config.common.bit_num == 4
    assert f"{SRC}:4: [common_quant_param] bit_num repeated; the first value is kept" in caplog.text


def test_repeated_section_is_dropped(caplog):
    text = WEIGHT + "bit_num=4\n[weight_quant_param]\nper_channel=false\n[common_quant_param]\nbit_num=99\nfoo=1\n"
    with caplog.at_level(logging.WARNING, logger="ptqlite.config"):
        config = parse_config(text, SRC)
    assert (config.common.bit_num, config.weight.per_channel) == (4, False)
    assert config.sections == ("common_quant_param", "weight_quant_param")
    assert f"{SRC}:6: section [common_quant_param] repeated; the repeat is ignored" in caplog.text


def test_unknown_key_is_an_error():
    assert error(WEIGHT + "[weight_quant_param]\nper_chanel=true\n") == (
        f"{SRC}:4: [weight_quant_param] per_chanel=true: per_chanel is not supported in [weight_quant_param]; "
        "expected one of per_channel, bias_correction, dequant_strategy, block_size, gather_min_bit_num, "
        "activation_weighted")


def test_unknown_section_is_ignored(caplog):
    text = "[registry]\nplugin_path=/x.so\nanything=goes\n" + WEIGHT + "[cpu_option_cfg_param]\nx=1\n"
    with caplog.at_level(logging.WARNING, logger="ptqlite.config"):
        config = parse_config(text, SRC)
    assert config.sections == ("common_quant_param",)
    assert f"{SRC}:1: unknown section [registry] ignored" in caplog.text
    assert f"{SRC}:6: unknown section [cpu_option_cfg_param] ignored" in caplog.text


def test_key_before_any_section():
    assert error("bit_num=8\n" + WEIGHT) == f"{SRC}:1: 'bit_num=8': expected a [section] header before the first key"


def test_line_without_equals_sign():
    assert error(WEIGHT + "bit_num 8\n") == f"{SRC}:3: [common_quant_param] 'bit_num 8': expected key=value"
    assert error(WEIGHT + "=16\n") == f"{SRC}:3: [common_quant_param] '=16': expected key=value"


def test_key_names_and_enum_values_are_case_sensitive():
    assert "Bit_Num is not supported" in error(WEIGHT + "Bit_Num=8\n")
    assert error("[common_quant_param]\nquant_type=Weight_Quant\n").endswith(
        "expected one of WEIGHT_QUANT, FULL_QUANT, DYNAMIC_QUANT")


def test_skip_quant_node_list():
    config = parse_config(WEIGHT + "skip_quant_node= conv2d_1 ,add_8,,concat_1 \n")
    assert config.common.skip_quant_node == ("conv2d_1", "add_8", "concat_1")


def test_calibrate_path_pairs_and_relative_directories():
    text = WEIGHT + "[data_preprocess_param]\ncalibrate_path=input:0:calib/in0 , mask:/abs/mask\ncalibrate_size=3\n" \
        "input_type=BIN\n"
    data = parse_config(text).data
    # The last ':' splits the name from the directory; a relative directory is kept as written (the data reader
    # resolves it against the current working directory, not the config file's folder).
    assert data.calibrate_path == (("input:0", "calib/in0"), ("mask", "/abs/mask"))


def test_full_quant_param_aliases_and_explicit_cpu():
    config = parse_config(FULL + "[data_preprocess_param]\n" + CALIB + "[full_quant_param]\n"
                          "activation_quant_method=RemovalOutlier\ntarget_device=CPU\nper_channel=False\n"
                          "bias_correction=TRUE\n")
    f = config.full
    assert (f.activation_quant_method, f.target_device, f.per_channel, f.bias_correction) == (
        "REMOVAL_OUTLIER", "CPU", False, True)


@pytest.mark.parametrize("device", ["NVGPU", "DSP", "ASCEND"])
def test_target_devices(device):
    assert parse_config(WEIGHT + f"[full_quant_param]\ntarget_device={device}\n").full.target_device == device


@pytest.mark.parametrize("strategy", ["ALWC", "ACWL"])
def test_dynamic_quant_strategy(strategy):
    text = f"[common_quant_param]\nquant_type=DYNAMIC_QUANT\n[dynamic_quant_param]\nquant_strategy={strategy}\n"
    assert parse_config(text).dynamic.quant_strategy == strategy


def test_ascend_context_is_passed_through():
    text = WEIGHT + "[ascend_context]\nprovider=ge\ninput_shape=input_1:[-1,32,32,4]\ndynamic_dims=[1~4],[8],[16]\n"
    config = parse_config(text)
    assert config.ascend_context == (("provider", "ge"), ("input_shape", "input_1:[-1,32,32,4]"),
                                     ("dynamic_dims", "[1~4],[8],[16]"))
    assert config.sections == ("common_quant_param", "ascend_context")


def test_seed_example_configs_parse():
    # The full-quant and mixed-bit examples of the reference documentation, as written there.
    full = parse_config("""[common_quant_param]
quant_type=FULL_QUANT
bit_num=8

[data_preprocess_param]
calibrate_path=input_name_1:/mnt/image/input_1_dir,input_name_2:input_2_dir
calibrate_size=100
input_type=IMAGE
image_to_format=RGB
normalize_mean=[127.5, 127.5, 127.5]
normalize_std=[127.5, 127.5, 127.5]
resize_width=224
resize_height=224
resize_method=LINEAR
center_crop_width=224
center_crop_height=224

[full_quant_param]
activation_quant_method=MAX_MIN
bias_correction=true
per_channel=true
target_device=NVGPU
""")
    assert full.data.calibrate_path == (("input_name_1", "/mnt/image/input_1_dir"), ("input_name_2", "input_2_dir"))
    assert full.data.normalize_std == (127.5, 127.5, 127.5)
    mixed = parse_config(WEIGHT + "bit_num=0\nmin_quant_weight_size=5000\nmin_quant_weight_channel=5\n"
                         "enable_encode = true\n[mixed_bit_weight_quant_param]\ninit_scale=0.02\nauto_tune=false\n")
    assert (mixed.is_mixed_bit, mixed.common.min_quant_weight_size, mixed.mixed_bit.init_scale) == (True, 5000, 0.02)


# ---------------------------------------------------------------- files


def test_load_config_reads_a_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.cfg"
    path.write_bytes(b"\xef\xbb\xbf" + WEIGHT.encode() + b"bit_num=3\n")
    config = load_config(path)
    assert (config.common.bit_num, config.source) == (3, str(path))


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.cfg'}: config file not found")):
        load_config(tmp_path / "none.cfg")
    binary = tmp_path / "binary.cfg"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=re.escape(f"{binary}: cannot read the config file")):
        load_config(binary)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read the config file")):
        load_config(tmp_path)
    bad = tmp_path / "bad.cfg"
    bad.write_text(WEIGHT + "bit_num=20\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"{bad}:3: [common_quant_param] bit_num=20: expected an integer in [0, 16]"


LINES = st.sampled_from([
    "[common_quant_param]", "[weight_quant_param]", "[data_preprocess_param]", "[full_quant_param]",
    "[mixed_bit_weight_quant_param]", "[dynamic_quant_param]", "[ascend_context]", "[other]", "quant_type=WEIGHT_QUANT",
    "quant_type=FULL_QUANT", "bit_num=4", "bit_num=0", "enable_encode=false", "dequant_strategy=ON_THE_FLY",
    "calibrate_path=a:b", "calibrate_size=3", "input_type=IMAGE", "normalize_mean=[1]", "normalize_std=[0]",
    "image_to_format=GRAY", "resize_width=4", "center_crop_height=2", "# c", "", "=", "x", "per_channel=tRuE",
    "block_size=32",
])


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(st.one_of(LINES, st.text(max_size=12)), max_size=12))
def test_any_text_gives_a_config_or_one_config_error_line(lines):
    try:
        config = parse_config("\n".join(lines), SRC)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{SRC}") and "\n" not in message
        assert re.match(rf"{re.escape(SRC)}(:\d+)?: ", message)
    else:
        assert isinstance(config, QuantConfig) and config.quant_type
