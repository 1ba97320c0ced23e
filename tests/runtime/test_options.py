"""Encoder options: declared once (EncodeOptions' field metadata), reaching every entry point."""
from dataclasses import dataclass

import pytest
from helpers import make_image

from sdc_runtime import options as encode_options
from sdc_runtime import sdc_info
from sdc_runtime.cli import build_parser
from sdc_runtime.options import EncodeOptions, option, option_specs
from sdc_runtime.pillow_plugin import encoder_keywords


@dataclass(frozen=True)
class WithSharpness(EncodeOptions):
    sharpness: float = option(float, "a new option, declared here alone", default=0.0)


@pytest.fixture
def sharpness_declared(monkeypatch):
    """An option added to the declaration, as a new feature would add it."""
    monkeypatch.setattr(encode_options, "ENCODE_OPTIONS", option_specs(WithSharpness))


def test_every_encode_option_is_a_cli_flag_a_query_parameter_and_a_pillow_keyword():
    from sdc_serve.app import parse_options

    specs = encode_options.ENCODE_OPTIONS
    assert {spec.name for spec in specs} == set(encode_options.ENCODE_OPTION_NAMES)
    encode = build_parser()._subparsers._group_actions[0].choices["encode"]
    flags = {option for action in encode._actions for option in action.option_strings}
    assert {spec.flag for spec in specs} <= flags
    assert set(parse_options({spec.name: "1" for spec in specs if spec.kind in (int, float)})) == \
        {spec.name for spec in specs if spec.kind in (int, float)}
    assert encoder_keywords({spec.name: None for spec in specs}).keys() == {spec.name for spec in specs}


def test_an_option_added_to_the_declaration_reaches_all_three_entry_points(sharpness_declared):
    from sdc_serve.app import parse_options

    args = build_parser().parse_args(["encode", "in.png", "out.sdc", "--sharpness", "0.5"])
    assert args.sharpness == 0.5
    assert parse_options({"sharpness": "0.25"}) == {"sharpness": 0.25}
    assert encoder_keywords({"sharpness": 0.75}) == {"sharpness": 0.75}


def test_without_the_declaration_no_entry_point_knows_the_option():
    from sdc_runtime import SdcInputError
    from sdc_serve.app import parse_options

    with pytest.raises(SystemExit):
        build_parser().parse_args(["encode", "in.png", "out.sdc", "--sharpness", "0.5"])
    with pytest.raises(SdcInputError, match="unknown encoder option"):
        parse_options({"sharpness": "0.25"})
    with pytest.raises(SdcInputError, match="unknown encoder option"):
        encoder_keywords({"sharpness": 0.75})


def test_a_query_value_of_the_wrong_type_names_the_option():
    from sdc_runtime import SdcInputError
    from sdc_serve.app import parse_options

    with pytest.raises(SdcInputError, match="colors must be int"):
        parse_options({"colors": "many"})
    with pytest.raises(SdcInputError, match="strip must be true or false"):
        parse_options({"strip": "yes"})
    assert parse_options({"strip": "true", "quant_step": "0.3", "mode": "u8"}) == \
        {"strip": True, "quant_step": 0.3, "mode": "u8"}


def test_a_quant_step_alone_chooses_u8_and_a_palette_size_alone_chooses_palette(codec):
    assert codec.options(quant_step=0.3).mode == "u8"
    assert codec.options(colors=32).mode == "palette"
    assert sdc_info(codec.encode(make_image(32, 24), quant_step=0.3))["mode"] == "u8"
