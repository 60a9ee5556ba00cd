"""Errors a user can cause. The CLI prints them in one line and exits 2; anything else is a bug."""
from __future__ import annotations


class PipelineError(Exception):
    """A user-caused problem: the message names the path or field and the fix."""


class ConfigError(PipelineError):
    """A bad value, type or key in pipeline.toml or on the command line."""


class InputError(PipelineError):
    """A stage's input folder is missing, unfinished, of another stage or of an unknown version."""


class DataError(PipelineError):
    """The data itself cannot be processed as asked (no usable items, a bad source folder, ...)."""
