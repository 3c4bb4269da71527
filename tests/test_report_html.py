"""The HTML report's structure, checked with the standard library's parser (runs
everywhere, unlike the Chromium check): well-formed nesting, the tables and their shapes,
decodable inline PNGs, nothing fetched from outside the file."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from hfbconvert.report import build_report, layer_table, render_html, totals_table

from .test_report import fake_meta

VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}  # id -> rows of cell texts
        self.images: list[dict] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(a)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def test_html_is_well_formed_with_the_report_tables_and_plots():
    meta, info = fake_meta()
    rep = build_report(meta, info)
    page = render_html(rep)
    p = _parse(page)
    assert p.errors == [] and p.stack == []  # every element closed, in order
    assert page.startswith("<!DOCTYPE html>")
    assert {"totals", "layers", "stages"} <= set(p.tables)
    head, rows = layer_table(rep)
    assert p.tables["layers"][0] == head
    assert p.tables["layers"][1:] == rows  # every row, every cell, escaped and back
    assert all(len(r) == len(head) for r in p.tables["layers"])
    assert len(rows) == len(rep["layers"]) + 1  # + "other layers"
    assert p.tables["totals"][1:] == totals_table(rep)[1]
    assert len(p.images) == 4
    for img in p.images:
        assert img["alt"]
        kind, _, data = img["src"].partition(",")
        assert kind == "data:image/png;base64"
        assert base64.b64decode(data, validate=True)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "script" not in p.tags and "link" not in p.tags  # self-contained, no code


def test_markup_in_names_is_escaped():
    meta, info = fake_meta()
    name = meta["layers"][0]["name"]
    evil = "<marquee>x</marquee>&"
    for ly in meta["layers"]:
        if ly["name"] == name:
            ly["name"] = evil
    for lp in meta["plan"]["layers"]:
        if lp["name"] == name:
            lp["name"] = evil
    p = _parse(render_html(build_report(meta, info)))
    assert p.errors == [] and "marquee" not in p.tags
    assert p.tables["layers"][1][0] == evil
