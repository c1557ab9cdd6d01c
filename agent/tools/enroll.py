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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from agent.core.cards import check_key_width, format_key
from agent.core.events import CardRead, Keypad, ReaderError, ReaderStatus
from agent.i18n import _
from agent.tools.words import detail_text, error_text, reader_error_text

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


@dataclass(frozen=True)
class OsdpSource:
    """The OSDP readers on one RS-485 port (agent.hw.osdp_reader.OsdpBus, Secure
    Channel with each reader's key, as the service runs them).

    readers: (name, address, scbk hex or None) for each reader on the bus.
    """

    port: str
    readers: tuple[tuple[str, int, str | None], ...]
    baudrate: int = 9600

    @property
    def label(self) -> str:
        return ", ".join(self.labels.values())

    @property
    def labels(self) -> dict[str, str]:
        return {name: _("{name}: osdp address {address} on {port}").format(name=name, address=address, port=self.port)
                for name, address, _k in self.readers}

    def open(self, submit: Callable[[Any], Any], key_width: int) -> Any:
        from agent.hw.osdp_reader import OsdpBus, OsdpReaderSpec

        try:
            check_serial_port(self.port)
        except DeviceBusy as exc:
            raise DeviceBusy(busy_message(f"serial port {self.port}", exc)) from exc
        try:
            bus = OsdpBus(
                self.port,
                [OsdpReaderSpec(name, address, scbk) for name, address, scbk in self.readers],
                submit=submit,
                baudrate=self.baudrate,
                key_width=key_width,
            )
        except ImportError as exc:  # the optional libosdp binding
            raise ValueError(f"OSDP bus {self.port}: {exc}") from exc
        bus.start()
        return bus

    @staticmethod
    def close(reader: Any) -> None:
        reader.stop()


Source = SerialSource | WiegandSource | OsdpSource


def _labels(source: Any) -> dict[str, str]:
    labels = getattr(source, "labels", None)
    return dict(labels) if labels is not None else {source.name: source.label}


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
            kind=reader_error_text(event.kind), detail=detail_text(event.detail), raw=event.raw)
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
    source: Source | Sequence[Source],
    *,
    out: TextIO | None = None,
    key_width: int = 24,
    count: int | None = None,
    timeout: float | None = None,
    json_output: bool = False,
    err: TextIO | None = None,
    on_ready: Callable[[Any], Any] | None = None,
) -> int:
    """Print each card read from source (one, or several read at once: every reader
    of the board) until count cards were read, timeout seconds passed, or Ctrl+C.
    Returns an exit code (agent.tools EXIT_*).

    on_ready(reader) is called once the reader is open (tests feed it then); with
    several sources, with the list of readers.
    """
    out = out or sys.stdout  # looked up per call, so a redirected stdout is honoured
    err = err or sys.stderr
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    try:
        check_key_width(key_width)
    except (TypeError, ValueError) as exc:
        print(f"gate-agent enroll: {error_text(exc)}", file=err)
        return EXIT_USAGE
    labels: dict[str, str] = {}
    for src in sources:
        labels.update(_labels(src))
    events: queue.SimpleQueue[Any] = queue.SimpleQueue()
    opened: list[tuple[Any, Any]] = []

    def close_all() -> None:
        for src, reader in reversed(opened):
            src.close(reader)

    try:
        for src in sources:
            opened.append((src, src.open(events.put, key_width)))
    except DeviceBusy as exc:
        close_all()
        print(f"gate-agent enroll: {error_text(exc)}", file=err)
        return EXIT_BUSY
    except (ValueError, OSError) as exc:
        close_all()
        print(f"gate-agent enroll: {error_text(exc)}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C while the readers open: stop, as at any other time
        close_all()
        return EXIT_OK
    except BaseException:
        close_all()
        raise
    first_label = next(iter(labels.values()))
    cards = 0
    try:
        if not json_output:
            print(
                _("Reading cards from {label} (key width {key_width}). Present each card; "
                  "any form shown can go into the access list. Ctrl+C to stop.").format(
                    label="; ".join(labels.values()), key_width=key_width),
                file=out,
                flush=True,
            )
        if on_ready is not None:
            readers = [reader for _src, reader in opened]
            on_ready(readers[0] if len(readers) == 1 else readers)
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
            label = labels.get(getattr(event, "reader", None), first_label)
            line = _describe(event, label, key_width, json_output, cards)
            if line is not None:
                print(line, file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        close_all()
    if count is not None and cards < count:
        print(
            "gate-agent enroll: " + _("cards read before the time ran out: {cards} of {count}").format(
                cards=cards, count=count), file=err
        )
        return EXIT_FAILED
    return EXIT_OK


# --- command line -------------------------------------------------------------------------


def _board_sources(board: Any, args: argparse.Namespace) -> list[Source]:
    """The sources for the board's readers (all of them, or --reader NAME), as the service builds them."""
    from agent.tools.board import factory_name

    readers = list(board.readers)
    if args.reader:
        readers = [r for r in readers if r.name == args.reader]
        if not readers:
            raise ValueError(
                _("reader {name!r} is not in {path}; its readers: {names}").format(
                    name=args.reader, path=board.source,
                    names=", ".join(r.name for r in board.readers) or _("none"))
            )
    if not readers:
        raise ValueError(
            _("{path} names no readers: add them to [gate.readers] (docs/readers.md), or give "
              "--serial PORT or --wiegand D0,D1").format(path=board.source)
        )
    sources: list[Source] = []
    factory = None
    osdp: dict[str, list[Any]] = {}
    for r in readers:
        if r.type == "wiegand":
            if factory is None:  # one factory for every Wiegand reader of the board
                factory = make_pin_factory(args.pin_factory or factory_name(board.pin_factory))
            wired = board.profile.readers.get(r.name)
            sources.append(WiegandSource(r.d0, r.d1, factory, pull=wired.pull if wired else "up",
                                         fixed_bits=args.bits or r.format, name=r.name))
        elif r.type in ("rdm6300", "emline"):
            sources.append(SerialSource(r.port, protocol=r.type, baudrate=r.baudrate, number=r.number,
                                        name=r.name))
        else:  # osdp: the readers sharing a port are one bus
            osdp.setdefault(r.port, []).append(r)
    for port, bus in osdp.items():
        sources.append(OsdpSource(port, tuple((r.name, r.address, r.scbk) for r in bus),
                                  baudrate=bus[0].baudrate))
    return sources


def _source_from_args(args: argparse.Namespace) -> tuple[list[Source], int]:
    """The sources to read and the key width: the explicit options, else the board's config."""
    from agent.tools.board import board_or_none, factory_name, read_board

    name = args.name or args.reader or READER_NAME
    if args.serial or args.wiegand or (args.reader and args.profile):
        # The hardware is given; the config, when there is one, still gives the key width and pins.
        board = board_or_none(args.config)
        key_width = args.key_width or (board.key_width if board else 24)
        if args.serial:
            return [SerialSource(args.serial, protocol=args.protocol, baudrate=args.baud, name=name)], key_width
        factory = make_pin_factory(args.pin_factory or factory_name(board.pin_factory if board else None))
        if args.wiegand:
            try:
                d0, d1 = (int(x) for x in args.wiegand.split(","))
            except ValueError:
                raise ValueError(
                    _("--wiegand {value!r}: give the two BCM pins as D0,D1, e.g. 20,21").format(value=args.wiegand)
                ) from None
            return [WiegandSource(d0, d1, factory, fixed_bits=args.bits, name=name)], key_width
        from agent.hw.profiles import load_profile

        profile = load_profile(args.profile)
        if args.reader not in profile.readers:
            raise ValueError(
                _("reader {reader!r} is not wired in profile {profile}; it wires: {readers}").format(
                    reader=args.reader, profile=profile.name, readers=", ".join(profile.readers) or "-")
            )
        pins = profile.readers[args.reader]
        return [WiegandSource(pins.d0, pins.d1, factory, pull=pins.pull, fixed_bits=args.bits,
                              name=name)], key_width
    board = read_board(args.config)  # BoardConfigError is a ValueError: one line, exit 2
    return _board_sources(board, args), args.key_width or board.key_width


def _cmd_enroll(args: argparse.Namespace) -> int:
    try:
        sources, key_width = _source_from_args(args)
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
        sources,
        key_width=key_width,
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
    from agent.tools.board import DEFAULT_PATH

    p.add_argument(
        "--config",
        default=str(DEFAULT_PATH),
        metavar="FILE",
        help=_("the board's config: without --serial, --wiegand or --profile, its readers (Wiegand, "
               "serial, OSDP), pins and key width are used (default {path})").format(path=DEFAULT_PATH),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--serial", metavar="PORT", help="a serial reader's port, e.g. /dev/gate-reader"
    )
    src.add_argument(
        "--wiegand", metavar="D0,D1", help="a Wiegand reader's BCM pins (after the level shifter)"
    )
    src.add_argument(
        "--reader", metavar="NAME", help=_("only this reader of the config (or, with --profile, a Wiegand reader "
                                           "of that profile)")
    )
    p.add_argument(
        "--protocol",
        choices=("rdm6300", "emline"),
        default="rdm6300",
        help="serial reader protocol (default rdm6300)",
    )
    p.add_argument("--baud", type=int, default=9600, help="serial baud rate (default 9600)")
    p.add_argument("--profile", help="hardware profile name or .toml path (for --reader; instead of the config)")
    p.add_argument("--bits", type=int, help="the Wiegand reader's fixed frame length, e.g. 26")
    p.add_argument(
        "--pin-factory",
        choices=PIN_FACTORIES,
        default=None,
        help=_("GPIO library: lgpio, or mock for a dry run (default: the config's hardware.pin_factory, "
               "else lgpio)"),
    )
    p.add_argument("--name", help="the reader's name to show (default: --reader, else enroll)")
    p.add_argument("--key-width", type=int, default=None,
                   help=_("the site's key width (default: the config's site.key_width, else 24)"))
    p.add_argument("--count", type=int, help="stop after this many cards")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_cmd_enroll)
    return p
