"""The real agent under simulated load, for the crash tests (tests/test_crash_recovery.py).

    python -m tests.crash_agent --config CFG --witness FILE --seed N [--rate R] [--no-crowd]

Runs ``gate-agent run --config CFG`` (agent.cli, so the real signal handling,
sd_notify READY=1 and clean stop) with one change: its pin factory is a
MockFactory that already has a SimulatedTurnstile attached (writing FILE, the
witness of every output change, fsync'd line by line) and a Crowd presenting
cards on the readers' D0/D1 mock pins from the moment the service listens on
them. The agent does not know: it sees its usual mock hardware. SIGTERM stops
the crowd and then the agent cleanly; SIGKILL is the point.
"""
from __future__ import annotations

import argparse
import random
import sys
import threading
from pathlib import Path

from gpiozero.pins.mock import MockFactory

import agent.service
from agent.cli import main as cli_main
from agent.config import load_config
from agent.simhw import Crowd, SimulatedReader, SimulatedTurnstile

# Cards the test's access list holds, and one it blocks; the crowd adds unknown ones.
CARDS = [f"100,{60000 + i}" for i in range(20)]
BLOCKED = ["7,1234"]


def power_on(factory: MockFactory, profile) -> None:
    """Outputs start at the Pi's power-on pulls (BCM 0-8 up, 9-27 down), before any claim."""
    for out in profile.output_pins().values():
        pin = factory.pin(f"GPIO{out.pin}")
        pin.pull = "up" if out.pin <= 8 else "down"
        pin.clear_states()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crash_agent")
    p.add_argument("--config", required=True)
    p.add_argument("--witness", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=600.0, help="cards a minute")
    p.add_argument("--no-crowd", action="store_true", help="no load (the final drain)")
    args = p.parse_args(argv)

    config = load_config(args.config)
    board = config.hardware.board
    rng = random.Random(args.seed)
    factory = MockFactory()
    power_on(factory, board)
    # Attached before the agent claims a pin: a pulse at start would be witnessed.
    turnstile = SimulatedTurnstile(factory, board, walk_s=(0.05, 0.4), rng=rng, witness=Path(args.witness),
                                   poll_s=0.002)
    agent.service.make_pin_factory = lambda kind: factory  # the only hook: the agent's own mock factory

    stop = threading.Event()
    if not args.no_crowd:
        readers = {r.name: SimulatedReader(factory, board, r.name, rng=random.Random(rng.random()))
                   for r in config.hardware.readers}
        # Impatient: people present while the lane is busy too (gate_busy), so there is always load.
        crowd = Crowd(readers, turnstile, cards=CARDS, rate_per_min=args.rate, unknown_ratio=0.1,
                      blocked_cards=BLOCKED, blocked_ratio=0.05, weights={"entry": 3, "exit": 1},
                      rng=random.Random(rng.random()), patient=False)
        threading.Thread(target=crowd.run, kwargs={"stop_event": stop}, name="crowd", daemon=True).start()
    try:
        return cli_main(["run", "--config", args.config])
    finally:
        stop.set()
        turnstile.close()


if __name__ == "__main__":
    sys.exit(main())
