"""One exception hierarchy so that callers can tell our failures from library bugs."""


class EarlyExitError(Exception):
    """Base class of every error this project raises on purpose."""


class ArtifactError(EarlyExitError):
    """A model artifact or manifest is missing, corrupt or does not match its manifest."""


class ConfigError(EarlyExitError):
    """An exit configuration is malformed or does not fit the model it is meant for."""


class FeedbackError(EarlyExitError):
    """A feedback record cannot be decoded."""
