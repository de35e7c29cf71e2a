"""The daemon's configuration: a TOML file read into a frozen dataclass.

Unknown keys are refused rather than ignored, so a misspelt setting is an error at
start or reload instead of a silent default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
from dataclasses import dataclass

# The words log_level accepts, as the logging module's levels.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

DEFAULT_ALLOWED_ROOTS = ("/run/uniond", "/var/lib/uniond", "/srv", "/home", "/tmp", "/var/tmp", "/mnt", "/media")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    log_level: str = "info"  # debug, info, warning, error
    # Mountpoints, uppers and workdirs must lie strictly below one of these.
    allowed_roots: tuple[str, ...] = DEFAULT_ALLOWED_ROOTS
    # Live mounts one non-root uid may own at once: bounds what one user can make root hold.
    max_mounts_per_uid: int = 64


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
        default = known[key].default
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: {key} must be a list of strings")
            data[key] = tuple(value)
        elif type(value) is not type(default):
            raise ConfigError(f"{path}: {key} must be a {type(default).__name__}")
    config = Config(**data)
    if config.log_level not in LEVELS:
        raise ConfigError(f"{path}: log_level must be one of {', '.join(LEVELS)}")
    for root in config.allowed_roots:
        if not os.path.isabs(root) or os.path.normpath(root) in ("/", "/run"):
            raise ConfigError(f"{path}: allowed_roots: {root!r} must be an absolute directory other than / and /run")
    if config.max_mounts_per_uid < 0:
        raise ConfigError(f"{path}: max_mounts_per_uid must be 0 or more")
    return config
