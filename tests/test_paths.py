"""Where mcpx keeps things (mcpx.paths), and the shim resolving the same config and socket paths on its own."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from mcpx import paths
from mcpx.config import load_config
from mcpx.errors import ConfigError

SHIM_SOURCE = Path(__file__).resolve().parents[1] / "shim" / "mcpx_shim.py"
ENV_NAMES = ("MCPX_CONFIG", "MCPX_SOCKET", "MCPX_STATE_DIR", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_STATE_HOME")
FALLBACK_SOCKET = Path(f"/tmp/mcpx-{os.getuid()}") / "mcpx.sock"


@pytest.fixture
def shim() -> ModuleType:
    """The shim as it is in the source tree (an installed copy of it could be stale)."""
    spec = importlib.util.spec_from_file_location("mcpx_shim_under_test", SHIM_SOURCE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: HOME is a fresh directory and none of mcpx's variables are set."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    directory = tmp_path / "home"
    directory.mkdir()
    monkeypatch.setenv("HOME", str(directory))
    return directory


# --- config ------------------------------------------------------------------------------------------------------


def test_config_defaults_to_home_dot_config(home: Path) -> None:
    assert paths.config_path(None) == home / ".config" / "mcpx" / "config.toml"


def test_config_uses_xdg_config_home_over_home(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert paths.config_path(None) == tmp_path / "xdg" / "mcpx" / "config.toml"


def test_config_uses_mcpx_config_over_xdg(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MCPX_CONFIG", "~/my.toml")
    assert paths.config_path(None) == home / "my.toml"


def test_config_explicit_wins_over_everything(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("MCPX_CONFIG", str(tmp_path / "env.toml"))
    assert paths.config_path(Path("~/explicit.toml")) == home / "explicit.toml"
    assert paths.config_path(tmp_path / "explicit.toml") == tmp_path / "explicit.toml"


def test_empty_variables_count_as_unset(home: Path) -> None:
    env = {"MCPX_CONFIG": "", "XDG_CONFIG_HOME": "", "MCPX_SOCKET": "", "XDG_RUNTIME_DIR": "", "MCPX_STATE_DIR": ""}
    assert paths.config_path(None, env) == home / ".config" / "mcpx" / "config.toml"
    assert paths.socket_path(None, env) == FALLBACK_SOCKET
    assert paths.state_dir(None, {**env, "XDG_STATE_HOME": ""}) == home / ".local" / "state" / "mcpx"


def test_the_env_mapping_argument_is_used_instead_of_the_process_environment(home: Path) -> None:
    env = {"MCPX_CONFIG": "/etc/a.toml", "MCPX_SOCKET": "/run/a.sock", "MCPX_STATE_DIR": "/var/a"}
    assert paths.config_path(None, env) == Path("/etc/a.toml")
    assert paths.socket_path(None, env) == Path("/run/a.sock")
    assert paths.state_dir(None, env) == Path("/var/a")


def test_config_is_explicit_only_when_named_by_flag_or_variable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not paths.config_is_explicit(None)
    assert paths.config_is_explicit(Path("/x.toml"))
    monkeypatch.setenv("MCPX_CONFIG", "")
    assert not paths.config_is_explicit(None)
    monkeypatch.setenv("MCPX_CONFIG", "/x.toml")
    assert paths.config_is_explicit(None)


def test_config_home_is_xdg_config_home_else_dot_config_and_the_env_file_sits_beside_the_config(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert paths.config_home() == home / ".config"
    monkeypatch.setenv("XDG_CONFIG_HOME", "~/xdg")
    assert paths.config_home() == home / "xdg"
    assert paths.env_file(tmp_path / "mine" / "mcpx.toml") == tmp_path / "mine" / "env"
    assert paths.socket_lock(tmp_path / "run" / "mcpx.sock") == tmp_path / "run" / "mcpx.sock.lock"


# --- socket ------------------------------------------------------------------------------------------------------


def test_socket_falls_back_to_a_per_uid_directory_in_tmp(home: Path) -> None:
    assert paths.socket_path(None) == FALLBACK_SOCKET


def test_socket_uses_xdg_runtime_dir(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert paths.socket_path(None) == tmp_path / "run" / "mcpx" / "mcpx.sock"


def test_socket_uses_mcpx_socket_over_xdg(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MCPX_SOCKET", "~/env.sock")
    assert paths.socket_path(None) == home / "env.sock"


def test_socket_configured_wins_over_everything(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MCPX_SOCKET", str(tmp_path / "env.sock"))
    assert paths.socket_path(Path("~/configured.sock")) == home / "configured.sock"


# --- state -------------------------------------------------------------------------------------------------------


def test_state_defaults_to_home_local_state(home: Path) -> None:
    assert paths.state_dir(None) == home / ".local" / "state" / "mcpx"


def test_state_uses_xdg_state_home(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert paths.state_dir(None) == tmp_path / "state" / "mcpx"


def test_state_uses_mcpx_state_dir_over_xdg(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MCPX_STATE_DIR", "~/env-state")
    assert paths.state_dir(None) == home / "env-state"


def test_state_configured_wins_over_everything(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("MCPX_STATE_DIR", str(tmp_path / "env-state"))
    assert paths.state_dir(Path("~/configured")) == home / "configured"


# --- the shim agrees ---------------------------------------------------------------------------------------------


def _daemon_socket(explicit_config: str | None) -> Path:
    """The socket mcpxd resolves without `--socket`: its config file's `[daemon] socket`, else mcpx.paths."""
    config_file = paths.config_path(Path(explicit_config) if explicit_config else None)
    config = load_config(
        config_file, missing_ok=not paths.config_is_explicit(Path(explicit_config) if explicit_config else None)
    )
    return paths.socket_path(config.daemon.socket)


def _shim_paths(shim: ModuleType, explicit_socket: str | None, explicit_config: str | None) -> tuple[str, str]:
    config = shim.config_path(explicit_config)
    socket = shim.socket_path(explicit_socket, explicit_config)
    assert isinstance(config, str)
    assert isinstance(socket, str)
    return config, socket


def _socket_toml(socket: str) -> str:
    return f'[daemon]\nsocket = "{socket}"\n\n[[proxy.upstream]]\nname = "a"\nurl = "https://example.com/mcp"\n'


Setup = Callable[[Path, Path, pytest.MonkeyPatch], str | None]  # (tmp, home, monkeypatch) → explicit --config


def _nothing_set(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    return None


def _xdg_runtime(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp / "run"))
    return None


def _mcpx_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp / "run"))
    monkeypatch.setenv("MCPX_SOCKET", str(tmp / "env.sock"))
    return None


def _mcpx_socket_with_tilde(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setenv("MCPX_SOCKET", "~/env.sock")
    return None


def _default_config_without_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    (home / ".config" / "mcpx").mkdir(parents=True)
    (home / ".config" / "mcpx" / "config.toml").write_text('[daemon]\nlog_level = "debug"\n', encoding="utf-8")
    monkeypatch.setenv("MCPX_SOCKET", str(tmp / "env.sock"))
    return None


def _default_config_with_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    (home / ".config" / "mcpx").mkdir(parents=True)
    (home / ".config" / "mcpx" / "config.toml").write_text(_socket_toml(str(tmp / "cfg.sock")), encoding="utf-8")
    monkeypatch.setenv("MCPX_SOCKET", str(tmp / "env.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp / "run"))
    return None


def _xdg_config_with_tilde_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp / "xdg"))
    (tmp / "xdg" / "mcpx").mkdir(parents=True)
    (tmp / "xdg" / "mcpx" / "config.toml").write_text(_socket_toml("~/cfg.sock"), encoding="utf-8")
    # A config in the HOME default location is not the one in use.
    (home / ".config" / "mcpx").mkdir(parents=True)
    (home / ".config" / "mcpx" / "config.toml").write_text(_socket_toml("/wrong.sock"), encoding="utf-8")
    return None


def _mcpx_config_with_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp / "xdg"))
    (tmp / "xdg" / "mcpx").mkdir(parents=True)
    (tmp / "xdg" / "mcpx" / "config.toml").write_text(_socket_toml("/wrong.sock"), encoding="utf-8")
    (tmp / "env.toml").write_text(_socket_toml(str(tmp / "from-env-config.sock")), encoding="utf-8")
    monkeypatch.setenv("MCPX_CONFIG", str(tmp / "env.toml"))
    monkeypatch.setenv("MCPX_SOCKET", str(tmp / "env.sock"))
    return None


def _mcpx_config_with_tilde(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    (home / "mine.toml").write_text(_socket_toml(str(tmp / "tilde-config.sock")), encoding="utf-8")
    monkeypatch.setenv("MCPX_CONFIG", "~/mine.toml")
    return None


def _explicit_config_with_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    (tmp / "env.toml").write_text(_socket_toml("/wrong.sock"), encoding="utf-8")
    monkeypatch.setenv("MCPX_CONFIG", str(tmp / "env.toml"))
    (tmp / "explicit.toml").write_text(_socket_toml(str(tmp / "explicit.sock")), encoding="utf-8")
    return str(tmp / "explicit.toml")


def _explicit_config_without_socket(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    (tmp / "explicit.toml").write_text("", encoding="utf-8")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp / "run"))
    return str(tmp / "explicit.toml")


def _socket_word_elsewhere_in_config(tmp: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> str | None:
    # "socket" appears in the file, but not as `[daemon] socket`.
    text = '[[proxy.upstream]]\nname = "socket"\nurl = "https://socket.example.com/"\n'
    (tmp / "explicit.toml").write_text(text, encoding="utf-8")
    monkeypatch.setenv("MCPX_SOCKET", str(tmp / "env.sock"))
    return str(tmp / "explicit.toml")


SETUPS: list[Setup] = [
    _nothing_set,
    _xdg_runtime,
    _mcpx_socket,
    _mcpx_socket_with_tilde,
    _default_config_without_socket,
    _default_config_with_socket,
    _xdg_config_with_tilde_socket,
    _mcpx_config_with_socket,
    _mcpx_config_with_tilde,
    _explicit_config_with_socket,
    _explicit_config_without_socket,
    _socket_word_elsewhere_in_config,
]


@pytest.mark.parametrize("setup", SETUPS, ids=[setup.__name__.strip("_") for setup in SETUPS])
def test_the_shim_resolves_the_same_config_and_socket_as_mcpxd(
    shim: ModuleType, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setup: Setup
) -> None:
    explicit_config = setup(tmp_path, home, monkeypatch)
    shim_config, shim_socket = _shim_paths(shim, None, explicit_config)
    assert Path(shim_config) == paths.config_path(Path(explicit_config) if explicit_config else None)
    assert Path(shim_socket) == _daemon_socket(explicit_config)
    assert "/wrong.sock" not in shim_socket


def test_the_shim_socket_resolution_follows_the_documented_order(
    shim: ModuleType, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    assert _shim_paths(shim, None, str(config))[1] == str(FALLBACK_SOCKET)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert _shim_paths(shim, None, str(config))[1] == str(tmp_path / "run" / "mcpx" / "mcpx.sock")
    monkeypatch.setenv("MCPX_SOCKET", str(tmp_path / "env.sock"))
    assert _shim_paths(shim, None, str(config))[1] == str(tmp_path / "env.sock")
    config.write_text(_socket_toml(str(tmp_path / "cfg.sock")), encoding="utf-8")
    assert _shim_paths(shim, None, str(config))[1] == str(tmp_path / "cfg.sock")
    assert _shim_paths(shim, "~/flag.sock", str(config))[1] == str(home / "flag.sock")


def test_the_shim_ignores_a_config_it_cannot_parse_and_mcpxd_rejects_it(
    shim: ModuleType, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MCPX_SOCKET", str(tmp_path / "env.sock"))
    for content in (b"[daemon]\nsocket = \n", b'[daemon]\nsocket = "\xff"\n', b"[daemon]\nsocket = 1\n"):
        config = tmp_path / "bad.toml"
        config.write_bytes(content)
        assert _shim_paths(shim, None, str(config))[1] == str(tmp_path / "env.sock")
        with pytest.raises(ConfigError):
            load_config(config)


def test_the_shim_bounds_the_config_file_as_mcpxd_does(shim: ModuleType) -> None:
    # The shim cannot import mcpx.paths: its copy of the bound is kept in step here.
    assert shim._MAX_CONFIG == paths.MAX_CONFIG_BYTES
