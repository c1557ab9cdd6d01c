"""The `gate-agent` command line.

Exit codes, the same for every tool (agent.exits.Exit, where each is
explained): 0 OK; 1 FAILED, the tool ran and the answer is "no" (doctor
found a FAIL, an unmet scenario expectation, a refused command); 2 USAGE,
bad input and nothing done (an option, an invalid scenario, config or access
list); 3 UNAVAILABLE, the running service holds the pins or the port, or a
reply did not come in time.
"""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_simulate(args: argparse.Namespace) -> int:
    from agent.i18n import _ as _t
    from agent.i18n import language
    from agent.simulator import (
        ScenarioError,
        Simulator,
        check_expectations,
        format_pretty,
        load_scenario,
    )
    from agent.tools.words import pretty_words, scenario_message

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        # The simulator's messages are English (a library, read by CI); here, for a person, in their language.
        text = str(exc) if language() == "en" else "\n".join(
            [_t("scenario {source}: problems: {n}; fix these:").format(source=exc.source, n=len(exc.problems)),
             *(f"  - {scenario_message(p)}" for p in exc.problems)])
        print(f"gate-agent simulate: {text}", file=sys.stderr)
        return 2
    sim = Simulator(scenario, trace_io=args.trace_io)
    out = sys.stdout
    if args.pretty:
        import fastpath

        print(f"# {scenario.name} — {scenario.source} (fastpath: {fastpath.IMPLEMENTATION})", file=out)
    site = bool(scenario.gates)  # a site scenario's lines say which gate made each record
    for step, gate, item in sim.run_gates():
        if args.pretty:
            print(format_pretty(item, scenario.start.tzinfo, pretty_words(), step, gate if site else None), file=out)
        else:
            # --steps: the step (and a site scenario's gate) beside the record, which holds the
            # contract's fields only.
            beside = {"step": step, "gate": gate} if site else {"step": step}
            line = {**beside, "record": item} if args.steps else item
            print(json.dumps(line, separators=(",", ":"), ensure_ascii=False), file=out)
    if args.check:
        failures = check_expectations(sim.records, scenario.expect, scenario.expect_lines, sim.record_steps,
                                      sim.record_gates)
        for f in failures:
            print("gate-agent simulate: " + _t("expectation not met: {problem}").format(problem=scenario_message(f)),
                  file=sys.stderr)
        if failures:
            return 1
        print("gate-agent simulate: " + _t("expectations met: {n}").format(n=len(scenario.expect)),
              file=sys.stderr)
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from agent.regional.ingest import main as ingest_main

    return ingest_main([a for a in args.ingest_args if a != "--"])


# Each tool's `add_*_parser(subparsers)`, in the order `--help` lists them, with the
# subcommands it adds. `gate-agent run` builds only its own parser: importing every tool
# to build its parser cost the service ~0.1 s and ~3 MB before READY (issue 12).
TOOLS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("agent.service", "add_run_parser", ("run",)),
    ("agent.config", "add_check_config_parser", ("check-config",)),
    ("agent.demo", "add_demo_parser", ("demo",)),
    ("agent.tools.provision", "add_provision_parser", ("provision",)),
    ("agent.tools.doctor", "add_doctor_parser", ("doctor",)),
    ("agent.tools.monitor", "add_monitor_parser", ("monitor",)),
    ("agent.tools.journaltool", "add_journal_parser", ("journal",)),
    ("agent.tools.presence", "add_presence_parsers", ("presence", "rollcall")),
    ("agent.tools.enroll", "add_enroll_parser", ("enroll",)),
    ("agent.tools.iotest", "add_iotest_parser", ("io-test",)),
    ("agent.tools.bundle", "add_bundle_parser", ("bundle",)),
    ("agent.tools.wiring", "add_wiring_parser", ("wiring",)),
    ("agent.simctl", "add_sim_parser", ("sim",)),
    ("agent.console", "add_console_parser", ("console",)),
    ("agent.regional.tools", "add_regional_parsers", ("acl", "cmd", "fleet", "keygen")),
)
BUILTIN = ("simulate", "ingest")


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand argv names (its first word), or None: no argv, an option first
    (`--help`, `--version`) or a word no tool adds; then every parser is built."""
    if not argv or argv[0].startswith("-"):
        return None
    name = argv[0]
    known = BUILTIN + tuple(n for _, _, names in TOOLS for n in names)
    return name if name in known else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `gate-agent` parser. With ``argv`` naming a tool's subcommand, only that
    tool's parsers are built (it alone is imported); without, or for `--help` and
    unknown words, every tool's, so the usage and the error list them all."""
    import importlib

    from agent.i18n import install_argparse, translate_parser

    only = _command_of(argv)
    install_argparse()  # argparse's own words ("usage:", "options") in the user's language
    p = argparse.ArgumentParser(prog="gate-agent", description="School turnstile agent")
    from agent import __version__
    from agent.i18n import _ as _t

    p.add_argument("--version", action="version", version=f"gate-agent {__version__}",
                   help=_t("print the version of gate-agent and exit"))
    sub = p.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a scenario in virtual time and print the event records (JSON Lines)",
        description="Run a scenario file (docs/scenarios.md) through the real decoders, "
        "fastpath and state machine in virtual time.",
    )
    sim.add_argument("scenario", help="scenario file (TOML)")
    sim.add_argument("--trace-io", action="store_true", help="add a line for every output change")
    sim.add_argument("--pretty", action="store_true", help="one human-readable line per record")
    sim.add_argument("--steps", action="store_true",
                     help="print each line as {\"step\": N, \"record\": ...}: the number of the step that caused it")
    sim.add_argument("--check", action="store_true", help="exit 1 when the scenario's [[expect]] entries are not met")
    sim.set_defaults(func=_cmd_simulate)

    ing = sub.add_parser(
        "ingest",
        help="the reference ingest for the regional side: store every gate's events, send acks",
        description="Subscribe to every gate's events (MQTT 5 shared subscription), store each once by id, "
        "and publish the ack for each journal. Options: --host --port --db --group --ca-file --cert-file "
        "--key-file --username --password (see `gate-agent ingest -- --help`).",
    )
    ing.add_argument("ingest_args", nargs=argparse.REMAINDER, help="options of the ingest")
    ing.set_defaults(func=_cmd_ingest)  # main() hands `ingest ...` straight to the ingest's own parser

    # The service and the technician's and the regional side's tools.
    for module, function, names in TOOLS:
        if only is None or only in names:
            getattr(importlib.import_module(module), function)(sub)
    return translate_parser(p)  # every help text, through the catalogue (agent/i18n.py)


def main(argv: list[str] | None = None) -> int:
    # `gate-agent ... | head`: the reader went away. Stop quietly, the way a C tool killed by
    # SIGPIPE does (exit 128+13), instead of a BrokenPipeError traceback; stdout is pointed
    # at /dev/null so the interpreter's last flush at exit cannot raise it again.
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ingest"]:
        from agent.regional.ingest import main as ingest_main

        return ingest_main([a for a in argv[1:] if a != "--"])
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
