"""The gpiozero pin factory by its config name, for the service and every tool.

``hardware.pin_factory`` names it: ``mock`` is gpiozero's MockFactory
(simulated pins: the demo, tests, a laptop), ``auto`` and ``lgpio`` the
lgpio factory of a Raspberry Pi 4 or 5. A factory that cannot start raises
PinFactoryError with its cause; each caller says what to do in its own
words (the service's log in English, the technician's tools through the
catalogue).
"""
from __future__ import annotations

from typing import Any

__all__ = ["PIN_FACTORIES", "PinFactoryError", "make_pin_factory", "rest_mock_inputs"]

PIN_FACTORIES = ("auto", "lgpio", "mock")


class PinFactoryError(RuntimeError):
    """The GPIO pin factory could not start; ``cause`` is what gpiozero or lgpio raised."""

    def __init__(self, kind: str, cause: BaseException) -> None:
        super().__init__(f"pin factory {kind!r} could not start ({type(cause).__name__}: {cause})")
        self.kind = kind
        self.cause = cause


def make_pin_factory(kind: str) -> Any:
    """A gpiozero pin factory for ``kind`` (one of PIN_FACTORIES); ValueError for another name."""
    if kind == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    if kind not in PIN_FACTORIES:
        raise ValueError(f"pin factory {kind!r}: allowed: {', '.join(PIN_FACTORIES)}")
    try:
        from gpiozero.pins.lgpio import LGPIOFactory

        return LGPIOFactory()
    except Exception as exc:  # ImportError (no lgpio), OSError / PinFactoryFallback (no GPIO chip)
        raise PinFactoryError(kind, exc) from exc


def rest_mock_inputs(factory: Any, profile: Any) -> None:
    """Put every simulated input at rest: turnstile ready, contacts quiet, fire loop closed."""
    for name, spec in profile.inputs.items():
        asserted = name == "ready"  # the only input asserted at rest
        pin = factory.pin(f"GPIO{spec.pin}")
        high = spec.active_high if asserted else not spec.active_high
        if high:
            pin.drive_high()
        else:
            pin.drive_low()
