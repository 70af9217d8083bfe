"""Errors an actor raises; each message says what was expected, what was found, what to do."""


class LensError(Exception):
    """Base of every error the lens actor raises on purpose."""


class UnsupportedArchitecture(LensError):
    pass


class ModelSourceError(LensError):
    """The model could not be found or loaded from where the manifest says."""


class DeviceUnavailable(LensError):
    """The device the actor was placed for is not present in this process."""


class ParityError(LensError):
    """The lens at the last layer does not reproduce the model's own logits."""


class DeviceMismatch(LensError):
    """A weight or lens tensor is not on the device the actor was placed for."""


class NumericOverflow(LensError):
    """The model's own forward pass gave non-finite logits in its compute dtype."""
