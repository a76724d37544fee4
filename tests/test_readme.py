"""The README's settings table is derived from config.SETTINGS, never edited by hand."""

from appd.config import settings_markdown
from conftest import ROOT


def test_readme_settings_table_is_current():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- settings table")) + 4
    end = readme.index("\n<!-- end of settings table -->")
    assert readme[start:end] == settings_markdown(), "run `python -m appd.config` and paste the table"
