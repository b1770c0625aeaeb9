"""The user's manual stays true: every setting is documented where users look for it."""

from __future__ import annotations

import pytest

from proxy.settings import Settings
from tests.servers import ROOT

SETTINGS = [f"BFF_{name.upper()}" for name in Settings.model_fields]


@pytest.mark.parametrize("document", ["README.md", ".env.example"])
def test_every_setting_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()

    missing = [name for name in SETTINGS if f"{name}" not in text]

    assert missing == []


def test_the_readme_names_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()

    assert "make run" in text and "make test" in text
