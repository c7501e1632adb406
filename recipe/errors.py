"""Errors raised on bad input. Every one names the problem; none is a bare traceback from torch."""


class RecipeError(Exception):
    """Base class of every error recipe raises on bad input."""


class ConfigError(RecipeError):
    """A config file or dict does not match its dataclass (unknown key, wrong type, bad choice)."""


class UnknownNameError(RecipeError):
    """An editor, model or dataset name that is not registered."""


class IncompatibleError(RecipeError):
    """A checkpoint, state or config made for another model."""
