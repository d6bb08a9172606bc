"""The option names the JavaScript client and the web page spell out, checked against `core.options.Options`
(they cannot import it): an option added to Options fails here until each list takes it, or says why not."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from core.options import COLORS, CROP_RANGE, INTERPOLATIONS, RESIZE_RANGE, TOP_K_RANGE, Options

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = [field.name for field in dataclasses.fields(Options)]
#: Options the page's form does not edit, and why: a new option goes on the form or here.
NOT_ON_THE_PAGE = {
    "mean": "normalisation constants of the model, not a user's choice",
    "std": "normalisation constants of the model, not a user's choice",
    "model_version": "pinned from the models list, not the options form",
    "model": "the model selector sets it at once (it resets the preprocessing options), not the form's Save",
}


def _js_list(path: Path, name: str) -> list[str]:
    match = re.search(rf"const {name} = \[([^\]]*)\]", path.read_text())
    assert match is not None, f"{name} not found in {path}"
    return re.findall(r'"([a-z_]+)"', match.group(1))


def test_the_js_client_names_every_option() -> None:
    assert sorted(_js_list(ROOT / "clients/js/client.js", "OPTION_NAMES")) == sorted(OPTIONS)


def test_the_js_types_declare_every_option_and_its_choices() -> None:
    types = (ROOT / "clients/js/client.d.ts").read_text()
    block = re.search(r"export interface Options \{(.*?)\n\}", types, re.DOTALL)
    assert block is not None
    assert sorted(re.findall(r"^\s+([a-z_]+)\??:", block.group(1), re.MULTILINE)) == sorted(OPTIONS)
    for alias, choices in (("Interpolation", INTERPOLATIONS), ("Color", COLORS)):
        union = re.search(rf"export type {alias} = ([^;]+);", types)
        assert union is not None and tuple(re.findall(r'"([a-z_]+)"', union.group(1))) == choices


def test_the_page_edits_every_option_but_those_it_says_it_leaves() -> None:
    fields = _js_list(ROOT / "web/app.js", "OPTION_FIELDS")
    assert sorted(fields) == sorted(set(OPTIONS) - set(NOT_ON_THE_PAGE))
    page = (ROOT / "web/index.html").read_text()
    for name, (low, high) in (("top_k", TOP_K_RANGE), ("resize", RESIZE_RANGE), ("crop", CROP_RANGE)):
        assert re.search(rf'name="{name}"[^>]* min="{low}" max="{high}"', page), name
    for name, choices in (("interpolation", INTERPOLATIONS), ("color", COLORS)):
        select = re.search(rf'<select[^>]* name="{name}".*?</select>', page, re.DOTALL)
        assert select is not None and tuple(re.findall(r'<option value="([a-z_]+)"', select.group(0))) == choices


def test_the_page_chooses_the_model_with_its_own_selector() -> None:
    page = (ROOT / "web/index.html").read_text()
    assert re.search(r'<select[^>]* name="model"', page)
    assert "client.setOptions({ model })" in (ROOT / "web/app.js").read_text()
