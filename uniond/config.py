"""The daemon's configuration: a TOML file read into a frozen dataclass.

Unknown keys are refused rather than ignored, so a misspelt setting is an error at
start or reload instead of a silent default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass

from uniond.logs import LEVELS


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    log_level: str = "info"  # debug, info, warning, error


def load(path: str, required: bool = False) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except (tomllib.TOMLDecodeError, OSError) as e:
        raise ConfigError(f"{path}: {e}") from None
    known = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        if not isinstance(value, type(known[key].default)):
            raise ConfigError(f"{path}: {key} must be a {type(known[key].default).__name__}")
    config = Config(**data)
    if config.log_level not in LEVELS:
        raise ConfigError(f"{path}: log_level must be one of {', '.join(LEVELS)}")
    return config
