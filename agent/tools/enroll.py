"""``gate-agent enroll``: show each card read live in all its forms, to register cards.

A technician holds each new card to a reader and copies a form into the
access list: "facility,card" (what a 26-bit reader's label shows), the
10-digit EM-Marine print (what is printed on the card), or "hex:" with the
key. Every form gives the same key at the site's key width; the line also
says which reader and format read it. Bad reads (checksum, parity, noise)
are shown too, so a bad cable shows up at once.

Sources: a serial reader (RDM6300 or an EM-Marine line reader, through
agent.hw.serial_reader.SerialReader) or a Wiegand reader on two GPIO pins
(agent.hw.wiegand_gpio.WiegandReader, with the pin factory passed in).
While the service holds the port or the pins, the tool says so and how to
stop it.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from agent.core.cards import check_key_width, format_key
from agent.core.events import CardRead, Keypad, ReaderError, ReaderStatus
from agent.i18n import _
from agent.tools.words import error_text, reader_error_text

from . import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PIN_FACTORIES,
    DeviceBusy,
    busy_message,
    check_serial_port,
    is_busy_error,
    make_pin_factory,
)

READER_NAME = "enroll"  # the name the tool's reader carries when none is given


@dataclass(frozen=True)
class SerialSource:
    """A serial reader: port, "rdm6300" or "emline", baud rate, how EM lines are
    read, and the reader's name in the gate config (shown on each line)."""

    port: str
    protocol: str = "rdm6300"
    baudrate: int = 9600
    number: str = "auto"
    name: str = READER_NAME

    @property
    def label(self) -> str:
        return _("{name}: {protocol} on {port}").format(name=self.name, protocol=self.protocol, port=self.port)

    def open(self, submit: Callable[[Any], Any], key_width: int) -> Any:
        from agent.hw.serial_reader import SerialReader

        try:
            check_serial_port(self.port)
        except DeviceBusy as exc:
            raise DeviceBusy(busy_message(_("serial port {port}").format(port=self.port), exc)) from exc
        reader = SerialReader(
            self.name,
            self.port,
            protocol=self.protocol,
            baudrate=self.baudrate,
            submit=submit,
            key_width=key_width,
            number=self.number,
        )
        reader.start()
        return reader

    @staticmethod
    def close(reader: Any) -> None:
        reader.stop()


@dataclass(frozen=True)
class WiegandSource:
    """A Wiegand reader on two GPIO pins (BCM numbers after the level shifter).

    fixed_bits: the reader's frame length when it is fixed (frames end at
    their last bit instead of after silence). clock: the silence timer's
    clock, in the edge timestamps' seconds (tests pass one they control).
    """

    d0: int
    d1: int
    factory: Any
    pull: str = "up"
    fixed_bits: int | None = None
    clock: Callable[[], float] = time.monotonic
    name: str = READER_NAME

    @property
    def label(self) -> str:
        return _("{name}: wiegand on D0=GPIO{d0} D1=GPIO{d1}").format(name=self.name, d0=self.d0, d1=self.d1)

    def open(self, submit: Callable[[Any], Any], key_width: int) -> Any:
        from agent.hw.wiegand_gpio import WiegandReader

        kwargs: dict[str, Any] = {"key_width": key_width}
        if self.fixed_bits:
            kwargs["fixed_bits"] = self.fixed_bits
        try:
            return WiegandReader(
                self.name,
                self.d0,
                self.d1,
                factory=self.factory,
                submit=submit,
                decoder_kwargs=kwargs,
                pull=self.pull,
                clock=self.clock,
            )
        except Exception as exc:
            if is_busy_error(exc):
                raise DeviceBusy(busy_message(f"GPIO{self.d0}/GPIO{self.d1}", exc)) from exc
            raise

    @staticmethod
    def close(reader: Any) -> None:
        reader.close()


def card_forms(event: CardRead, key_width: int = 24) -> dict:
    """Every form of a card read, as the access list accepts them."""
    forms = format_key(event.key, key_width)
    return {
        "facility_card": forms["facility_card"],
        "em_print": forms["em_print"],
        "hex": forms["hex"],
        "key": forms["key"],
        "format": event.format,
        "raw": event.raw,
    }


def _describe(event: Any, label: str, key_width: int, as_json: bool, n: int) -> str | None:
    if isinstance(event, CardRead):
        forms = card_forms(event, key_width)
        if as_json:
            return json.dumps({"type": "card", "reader": label, **forms})
        return _("card {n}: facility,card {facility_card}   print {em_print}   {hex}   key {key}   "
                 "({format} via {label}; raw {raw})").format(
            n=n, facility_card=forms["facility_card"], em_print=forms["em_print"] or "-", hex=forms["hex"],
            key=forms["key"], format=event.format, label=label, raw=event.raw)
    if isinstance(event, ReaderError):
        if as_json:
            return json.dumps(
                {
                    "type": "error",
                    "reader": label,
                    "kind": event.kind,
                    "detail": event.detail,
                    "raw": event.raw,
                }
            )
        return _("bad read ({kind}): {detail}; raw {raw}; present the card again").format(
            kind=reader_error_text(event.kind), detail=event.detail, raw=event.raw)
    if isinstance(event, Keypad):
        if as_json:
            return json.dumps({"type": "keypad", "reader": label, "keys": event.keys})
        return _("keypad: {keys}").format(keys=event.keys)
    if isinstance(event, ReaderStatus):
        if as_json:
            return json.dumps({"type": "status", "reader": label, "online": event.online})
        if event.online:
            return _("reader ready: {label}").format(label=label)
        return _("reader offline: {label}; check its cable and power (waiting for it to come back)").format(label=label)
    return None


def run_enroll(
    source: SerialSource | WiegandSource,
    *,
    out: TextIO | None = None,
    key_width: int = 24,
    count: int | None = None,
    timeout: float | None = None,
    json_output: bool = False,
    err: TextIO | None = None,
    on_ready: Callable[[Any], Any] | None = None,
) -> int:
    """Print each card read from source until count cards were read, timeout
    seconds passed, or Ctrl+C. Returns an exit code (agent.tools EXIT_*).

    on_ready(reader) is called once the reader is open (tests feed it then).
    """
    out = out or sys.stdout  # looked up per call, so a redirected stdout is honoured
    err = err or sys.stderr
    try:
        check_key_width(key_width)
    except (TypeError, ValueError) as exc:
        print(f"gate-agent enroll: {error_text(exc)}", file=err)
        return EXIT_USAGE
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    try:
        reader = source.open(events.put, key_width)
    except DeviceBusy as exc:
        print(f"gate-agent enroll: {error_text(exc)}", file=err)
        return EXIT_BUSY
    except (ValueError, OSError) as exc:
        print(f"gate-agent enroll: {error_text(exc)}", file=err)
        return EXIT_USAGE
    cards = 0
    try:
        if not json_output:
            print(
                _("Reading cards from {label} (key width {key_width}). Present each card; "
                  "any form shown can go into the access list. Ctrl+C to stop.").format(
                    label=source.label, key_width=key_width),
                file=out,
                flush=True,
            )
        if on_ready is not None:
            on_ready(reader)
        deadline = None if timeout is None else time.monotonic() + timeout
        while count is None or cards < count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                event = events.get(timeout=wait)
            except queue.Empty:
                continue
            if isinstance(event, CardRead):
                cards += 1
            line = _describe(event, source.label, key_width, json_output, cards)
            if line is not None:
                print(line, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        source.close(reader)
    if count is not None and cards < count:
        print(
            "gate-agent enroll: " + _("cards read before the time ran out: {cards} of {count}").format(
                cards=cards, count=count), file=err
        )
        return EXIT_FAILED
    return EXIT_OK


# --- command line -------------------------------------------------------------------------


def _source_from_args(args: argparse.Namespace) -> SerialSource | WiegandSource:
    name = args.name or args.reader or READER_NAME
    if args.serial:
        return SerialSource(args.serial, protocol=args.protocol, baudrate=args.baud, name=name)
    factory = make_pin_factory(args.pin_factory)
    if args.wiegand:
        try:
            d0, d1 = (int(x) for x in args.wiegand.split(","))
        except ValueError:
            raise ValueError(
                _("--wiegand {value!r}: give the two BCM pins as D0,D1, e.g. 20,21").format(value=args.wiegand)
            ) from None
        return WiegandSource(d0, d1, factory, fixed_bits=args.bits, name=name)
    from agent.hw.profiles import load_profile

    if not args.profile:
        raise ValueError(_("--reader needs --profile (the board's hardware profile, e.g. pi4-relay4)"))
    profile = load_profile(args.profile)
    if args.reader not in profile.readers:
        raise ValueError(
            _("reader {reader!r} is not wired in profile {profile}; it wires: {readers}").format(
                reader=args.reader, profile=profile.name, readers=", ".join(profile.readers) or "-")
        )
    pins = profile.readers[args.reader]
    return WiegandSource(pins.d0, pins.d1, factory, pull=pins.pull, fixed_bits=args.bits, name=name)


def _cmd_enroll(args: argparse.Namespace) -> int:
    try:
        source = _source_from_args(args)
    except ValueError as exc:
        print(f"gate-agent enroll: {error_text(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - lgpio raises its own plain errors: no chip, no permission, busy
        if is_busy_error(exc):
            print(f"gate-agent enroll: {busy_message(_('the GPIO chip'), exc)}", file=sys.stderr)
            return EXIT_BUSY
        print("gate-agent enroll: " + _("cannot use the GPIO pins: {error}").format(error=exc), file=sys.stderr)
        return EXIT_USAGE
    return run_enroll(
        source,
        key_width=args.key_width,
        count=args.count,
        timeout=args.timeout,
        json_output=args.json,
    )


def add_enroll_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``enroll`` subcommand (func: args -> exit code) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "enroll",
        help="show each card read live in all its forms, to register cards",
        description="Show each card read live: facility,card; the 10-digit print; hex; the key; "
        "the reader and format. Stop the service first if it uses the same reader "
        "(sudo systemctl stop gate-agent).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--serial", metavar="PORT", help="a serial reader's port, e.g. /dev/gate-reader"
    )
    src.add_argument(
        "--wiegand", metavar="D0,D1", help="a Wiegand reader's BCM pins (after the level shifter)"
    )
    src.add_argument(
        "--reader", metavar="NAME", help="a Wiegand reader of the hardware profile (with --profile)"
    )
    p.add_argument(
        "--protocol",
        choices=("rdm6300", "emline"),
        default="rdm6300",
        help="serial reader protocol (default rdm6300)",
    )
    p.add_argument("--baud", type=int, default=9600, help="serial baud rate (default 9600)")
    p.add_argument("--profile", help="hardware profile name or .toml path (for --reader)")
    p.add_argument("--bits", type=int, help="the Wiegand reader's fixed frame length, e.g. 26")
    p.add_argument(
        "--pin-factory",
        choices=PIN_FACTORIES,
        default="lgpio",
        help="GPIO library (default lgpio; mock for a dry run)",
    )
    p.add_argument("--name", help="the reader's name to show (default: --reader, else enroll)")
    p.add_argument("--key-width", type=int, default=24, help="the site's key width (default 24)")
    p.add_argument("--count", type=int, help="stop after this many cards")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_enroll)
    return p
