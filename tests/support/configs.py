"""Writing config files and collecting what the loader finds wrong with them, for the config tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpx.config.load import load_config
from mcpx.errors import ConfigError


def write_config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_problems(path: Path) -> list[str]:
    """Every problem `load_config` reports for `path` (it must refuse the file, and say each problem once)."""
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems
    assert str(raised.value) == "\n".join(raised.value.problems)
    return raised.value.problems
