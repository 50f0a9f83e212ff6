"""The try-it page ships in the wheel: hatchling's own file selection for the wheel (what `pip wheel` packs,
without building one; tests/test_packaging.py builds and installs the wheel itself) holds the static files,
and `serve` finds them next to its module, where an installed package has them."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_page():
    builders = pytest.importorskip("hatchling.builders.wheel", reason="the test extra installs hatchling")
    shipped = {f.distribution_path for f in builders.WheelBuilder(str(ROOT)).recurse_included_files()}
    static = {f"w2vbert_asr/static/{p.name}" for p in (ROOT / "w2vbert_asr" / "static").iterdir()}
    assert {"w2vbert_asr/static/index.html", "w2vbert_asr/static/app.js", "w2vbert_asr/static/style.css"} <= static
    assert static <= shipped
    assert "w2vbert_asr/serve.py" in shipped and "w2vbert_asr/conf/config.yaml" in shipped

    from w2vbert_asr.serve import STATIC_DIR

    assert STATIC_DIR == ROOT / "w2vbert_asr" / "static"
