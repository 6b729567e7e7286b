"""User-facing errors. The CLI prints these as one line, never as a traceback."""


class FluxMoEError(Exception):
    """Base class for errors caused by user input (bad file, unknown name, impossible budget)."""


class ConfigError(FluxMoEError, ValueError):
    """A config, profile, plan or workload file (or dict) has a missing or invalid field."""


class UnknownNameError(FluxMoEError, KeyError):
    """A model or GPU name that we do not ship; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InfeasibleError(FluxMoEError):
    """No placement fits the memory budget; the message says the smallest budget that works."""
