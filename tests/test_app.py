"""The dashboard entry point renders without an exception."""

from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT


def test_landing_page_renders():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=30).run()
    assert not at.exception
    assert "PruneScope" in at.title[0].value
