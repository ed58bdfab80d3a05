"""The `trackside` command (SPEC §1, §9, §11): up, forward, publish, sql, import, migrate, demo, stop, pause, resume,
gate, versions."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pydantic import ValidationError

from streams.errors import TracksideError
from streams.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        raise TracksideError(f"bad TRACKSIDE_* setting: {error}") from None


def cmd_up(args: argparse.Namespace) -> int:
    from streams.ops.stack import Stack

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stack = Stack(_settings())
    try:
        stack.start()
        print(stack.ready_line, flush=True)
        stack.supervise(stop)
    finally:
        stack.stop()
    print("trackside stopped", flush=True)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from streams.console.app import ConsoleServer
    from streams.store.clickhouse import Store, query_store

    settings = _settings()
    if not settings.console_port:
        raise TracksideError("TRACKSIDE_CONSOLE_PORT is 0: the console is off")
    store = query_store(settings)  # a running `up`'s query service, or the store itself
    if isinstance(store, Store):
        def read(sql: str, parameters: dict) -> list[dict]:
            return store.query_json(sql, parameters, person=False)
    else:
        read = store.query_json
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server = ConsoleServer(settings, read)
    if not server.start():
        raise TracksideError(f"the console cannot listen on {settings.console_host}:{settings.console_port}; "
                             "set TRACKSIDE_CONSOLE_PORT")
    print(f"trackside console {server.url}", flush=True)
    try:
        stop.wait()
    finally:
        server.stop()
        store.close()
    return 0


def cmd_forward(args: argparse.Namespace) -> int:
    from streams import telemetry
    from streams.ops.forward import build_targets, run_forwarders

    settings = _settings()
    if not build_targets(settings):  # ConfigError on a bad URL, too
        raise TracksideError("no alert target: set TRACKSIDE_ALERTMANAGER_URL and/or TRACKSIDE_ALERT_WEBHOOK_URL")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    metrics = (telemetry.start_metrics_server(args.metrics_port, host=settings.metrics_host)
               if args.metrics_port else None)
    try:
        run_forwarders(settings, stop)
    finally:
        if metrics is not None:
            metrics.stop()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from jobs.publish import publish_file

    report = publish_file(_settings(), args.file, progress=sys.stderr.isatty(), deployments=args.deployments)
    for error in report.errors[:20]:
        print(f"rejected: {error}", file=sys.stderr)
    print(f"published produced={report.produced} rejected={report.rejected}")
    return 1 if report.rejected else 0


def cmd_sql(args: argparse.Namespace) -> int:
    from streams.store.saved_queries import load_query, parse_params
    from streams.store.clickhouse import query_store

    if (args.query is None) == (args.file is None):
        raise TracksideError("give a query or --file FILE (a saved query: sql/queries/NAME.sql, or its NAME)")
    sql, defaults = load_query(args.file) if args.file else (args.query, {})
    parameters = parse_params(args.param, defaults)
    store = query_store(_settings())
    try:
        output = store.query_raw(sql, args.format, readonly=not args.write, parameters=parameters or None)
    finally:
        store.close()
    sys.stdout.buffer.write(output)
    sys.stdout.flush()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    import orjson

    from jobs.publish import publish_lines
    from jobs.tau_bench import import_runs, summary, write_jsonl

    events = import_runs(args.file)
    facts = " ".join(f"{key}={value}" for key, value in summary(events).items())
    if args.out:
        write_jsonl(events, args.out)
        print(f"wrote {args.out}: {facts}")
        return 0
    report = publish_lines(_settings(), (orjson.dumps(event) for event in events))
    print(f"published produced={report.produced} rejected={report.rejected}: {facts}")
    return 1 if report.rejected else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply the store's migrations and create the topics, then exit: the one-shot set-up of a
    deployment on a real cluster (a Kubernetes Job, a compose service), before the processors."""
    from streams.ops.broker import ensure_topics, wait_for_broker
    from streams.store.clickhouse import open_store

    settings = _settings()
    settings.policy()  # a bad policy file fails the set-up, not the processors later
    store = open_store(settings)
    try:
        applied = store.migrate()
    finally:
        store.close()
    print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
    if not settings.embedded:
        wait_for_broker(settings)
        created = ensure_topics(settings)
        print(f"topics created: {', '.join(created) or 'none (all exist)'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(_settings(), runs=args.runs, seed=args.seed, tau_bench=args.tau_bench, serve_s=args.serve)


def cmd_control(args: argparse.Namespace) -> int:
    import getpass
    import time

    from streams.contracts.controls import make_control
    from streams.ops.controls import issue

    subject = ({"run_id": args.run_id} if args.action == "stop_run"
               else {"agent_id": args.agent, "agent_version": args.version})
    control = make_control(action=args.action, reason=args.reason, issued_by=args.by or getpass.getuser(),
                           ts=time.time_ns() // 1_000_000, **subject)
    issue(_settings(), control)
    print(f"{args.action} control_id={control['control_id']}")
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    """SPEC §11: exit 0 pass, 1 fail, 2 too few paired tasks, 3 error (any error: CI must not
    read a crash as a verdict)."""
    from streams.ops.gates import run_gate, summary_line, write_reports

    try:
        gate = run_gate(_settings(), agent=args.agent, candidate=args.candidate, baseline=args.baseline,
                        environment=args.environment)
        write_reports(gate, args.report, args.junit)
    except TracksideError as error:
        print(f"trackside gate: error: {error}", file=sys.stderr)
        return 3
    except Exception as error:  # noqa: BLE001 (exit 3 whatever failed, with what it was)
        print(f"trackside gate: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 3
    print(summary_line(gate))
    return gate.result.exit_code


def cmd_versions(args: argparse.Namespace) -> int:
    from streams.ops.versions import diff_versions, list_versions
    from streams.store.clickhouse import query_store

    store = query_store(_settings())
    try:
        if args.diff:
            print(diff_versions(store, args.agent, *args.diff))
        else:
            print(list_versions(store, args.agent))
    finally:
        store.close()
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="trackside", description="Live monitoring of AI agents in production.")
    top.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = top.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the embedded stack in the foreground until Ctrl-C")
    up.set_defaults(handler=cmd_up)

    console = commands.add_parser(
        "console", help="serve the web console and JSON API alone (SPEC §10) against the configured store and broker")
    console.set_defaults(handler=cmd_console)

    forward = commands.add_parser(
        "forward", help="deliver trackside.alerts to Alertmanager and/or a webhook until Ctrl-C (what `up` runs "
                        "as a thread when TRACKSIDE_ALERTMANAGER_URL or TRACKSIDE_ALERT_WEBHOOK_URL is set)")
    forward.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (default: off)")
    forward.set_defaults(handler=cmd_forward)

    publish = commands.add_parser("publish", help="produce JSON Lines agent events to agent.events")
    publish.add_argument("file", help="a JSON Lines file, or - for standard input")
    publish.add_argument("--deployments", action="store_true",
                         help="the lines are deployment events (SPEC §5): produce them to agent.deployments")
    publish.set_defaults(handler=cmd_publish)

    sql = commands.add_parser("sql", help="run ClickHouse SQL against the store")
    sql.add_argument("query", nargs="?")
    sql.add_argument("--file", help="run a saved query: a file, or the NAME of sql/queries/NAME.sql")
    sql.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a query parameter {NAME:Type}; a saved query's header gives the defaults")
    sql.add_argument("--format", default="PrettyCompact", help="any ClickHouse output format (default PrettyCompact)")
    sql.add_argument("--write", action="store_true", help="allow statements that change data")
    sql.set_defaults(handler=cmd_sql)

    importer = commands.add_parser("import", help="turn recorded agent runs into agent events and publish them")
    importer.add_argument("source", choices=["tau-bench"], help="the format of FILE")
    importer.add_argument("file", help="e.g. ../shared/data/tau-bench/gpt-4o-airline.json")
    importer.add_argument("--out", help="write the events as JSON Lines here instead of publishing them")
    importer.set_defaults(handler=cmd_import)

    migrate = commands.add_parser("migrate", help="apply the store's migrations and create the topics, then exit")
    migrate.set_defaults(handler=cmd_migrate)

    stop = commands.add_parser("stop", help="tell the agent to stop a run at its next step (a stop_run control)")
    stop.add_argument("run_id")
    pause = commands.add_parser("pause", help="tell agents and deploy tooling to refuse new runs of a version")
    resume = commands.add_parser("resume", help="lift a version's pause")
    for command, action in ((stop, "stop_run"), (pause, "pause_version"), (resume, "resume_version")):
        if command is not stop:
            command.add_argument("agent")
            command.add_argument("version")
        command.add_argument("--reason", required=True, help="why: kept with the control (the audit trail)")
        command.add_argument("--by", help="who asks (default: the OS user)")
        command.set_defaults(handler=cmd_control, action=action)

    gate = commands.add_parser(
        "gate", help="compare a release candidate's eval runs with its baseline's on the same tasks (SPEC §11): "
                     "exit 0 pass, 1 shown worse beyond the policy's margin, 2 too few paired tasks, 3 error")
    gate.add_argument("--agent", required=True)
    gate.add_argument("--candidate", required=True, help="the version to release")
    gate.add_argument("--baseline", help="default: the agent's stable version (newest stable deployment)")
    gate.add_argument("--environment", default="eval", help="runs of this environment (runs.environment; default eval)")
    gate.add_argument("--report", metavar="FILE.md", help="write the Markdown report here (e.g. $GITHUB_STEP_SUMMARY)")
    gate.add_argument("--junit", metavar="FILE.xml", help="write JUnit XML here")
    gate.set_defaults(handler=cmd_gate)

    versions = commands.add_parser("versions", help="an agent's versions: roles, gate and canary verdicts, rollbacks; "
                                                    "--diff A B: what changed in configuration and behaviour")
    versions.add_argument("agent")
    versions.add_argument("--diff", nargs=2, metavar=("A", "B"), help="compare version A (before) with B (after)")
    versions.set_defaults(handler=cmd_versions)

    demo = commands.add_parser("demo", help="start the stack, play a simulated fleet, print what it found")
    demo.add_argument("--runs", type=int, default=600)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--tau-bench", metavar="FILE",
                      help="also play these recorded runs, e.g. ../shared/data/tau-bench/gpt-4o-airline.json")
    demo.add_argument("--serve", type=float, nargs="?", const=600.0, default=0.0, metavar="SECONDS",
                      help="then keep the stack and its console up this long (default 600 s) or until Ctrl-C")
    demo.set_defaults(handler=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
    except SystemExit as usage:
        # argparse exits 2 on a usage error; to `trackside gate` 2 means too few tasks (SPEC §11)
        if usage.code == 2 and "gate" in words[:2]:
            raise SystemExit(3) from None
        raise
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.command in ("up", "forward") else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except TracksideError as error:
        print(f"trackside: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
