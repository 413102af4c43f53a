"""Configuration: TOML file → validated, immutable `Config`. Reload builds a new one and swaps it in."""

from mcpx.config.load import load_config, parse_config
from mcpx.config.model import (
    AuthConfig,
    BearerEnvAuth,
    BearerFileAuth,
    Config,
    DaemonConfig,
    NoAuth,
    StaticHeaderAuth,
    UpstreamConfig,
)

__all__ = [
    "AuthConfig",
    "BearerEnvAuth",
    "BearerFileAuth",
    "Config",
    "DaemonConfig",
    "NoAuth",
    "StaticHeaderAuth",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]
