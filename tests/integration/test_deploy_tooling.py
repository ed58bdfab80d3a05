"""The deploy tooling examples of infra/ against the real canary endpoint (SPEC §10): the Argo
Rollouts AnalysisTemplate's successCondition and failureCondition (expr-lang over `result`),
evaluated on the JSON of GET /api/v1/canaries/{agent}/{version}, and the Flagger webhook's rule
(2xx passes) on the status of GET .../gate, for a rolled-back canary and a pending one."""

import re
from pathlib import Path

import orjson
import pytest

from jobs.publish import agent_key, publish_lines
from streams.contracts import topics
from tests.conftest import RunningStack, canary_runs

pytestmark = pytest.mark.integration

INFRA = Path(__file__).parents[2] / "infra"
T0 = 1_795_000_000_000  # 2026-11-18: event times may not be more than a day ahead


# --- a tiny, honest evaluator of the expr-lang forms the template uses ------------------------------

TOKEN = re.compile(r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>==|!=|&&|\|\||\[|\]|\(|\)|,)'
                   r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*))")


def evaluate(expression: str, result: dict) -> bool:
    """expr-lang's `==`, `!=`, `in [..]`, `&&`, `||`, parentheses, string literals and member
    access on `result`; anything else is a SyntaxError (the template must stay within these)."""
    tokens, at = [], 0
    while at < len(expression.rstrip()):
        match = TOKEN.match(expression, at)
        if not match or match.end() == at:
            raise SyntaxError(f"cannot read {expression[at:]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        at = match.end()
    tokens.append(("end", ""))
    pos = 0

    def peek():
        return tokens[pos]

    def take(value=None):
        nonlocal pos
        token = tokens[pos]
        if value is not None and token[1] != value:
            raise SyntaxError(f"expected {value!r}, got {token[1]!r}")
        pos += 1
        return token

    def operand():
        kind, value = take()
        if kind == "string":
            return orjson.loads(value)
        if value == "(":
            inner = disjunction()
            take(")")
            return inner
        if value == "[":
            items = []
            while peek()[1] != "]":
                items.append(operand())
                if peek()[1] == ",":
                    take(",")
            take("]")
            return items
        if kind == "name":
            head, *rest = value.split(".")
            if head in ("true", "false"):
                return head == "true"
            if head != "result":
                raise SyntaxError(f"unknown name {head!r}")
            node = result
            for part in rest:
                node = node.get(part) if isinstance(node, dict) else None
            return node
        raise SyntaxError(f"unexpected {value!r}")

    def comparison():
        left = operand()
        kind, value = peek()
        if value in ("==", "!="):
            take()
            right = operand()
            return (left == right) if value == "==" else (left != right)
        if kind == "name" and value == "in":
            take()
            return left in operand()
        return left

    def conjunction():
        value = comparison()
        while peek()[1] == "&&":
            take()
            value = comparison() and value
        return value

    def disjunction():
        value = conjunction()
        while peek()[1] == "||":
            take()
            value = conjunction() or value
        return value

    value = disjunction()
    if peek()[0] != "end":
        raise SyntaxError(f"left over: {tokens[pos:]}")
    return bool(value)


def test_the_evaluator_reads_what_it_claims():
    assert evaluate('result.verdict in ["pending", "promote"]', {"verdict": "promote"})
    assert not evaluate('result.verdict in ["pending", "promote"]', {"verdict": "rollback"})
    assert evaluate('result.verdict == "rollback" || (result.a != "x" && result.b == "y")', {"a": "z", "b": "y"})
    with pytest.raises(SyntaxError):
        evaluate("len(result.metrics) > 2", {})


def yaml_scalar(text: str, key: str) -> str:
    """The value of `key:` in a YAML file of ours, unquoted (single or double quotes, or a folded >- block)."""
    match = re.search(rf"^(\s*){key}:\s*(.*)$", text, re.MULTILINE)
    assert match, f"no {key} in the file"
    value = match.group(2).strip()
    if value.startswith("'") and value.endswith("'"):
        return value[1:-1].replace("''", "'")
    if value.startswith('"') and value.endswith('"'):
        return orjson.loads(value)
    if value == ">-":  # the folded lines indented deeper than the key
        lines = text[match.end():].splitlines()[1:]
        indent = len(match.group(1))
        block = []
        for line in lines:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            block.append(line.strip())
        return " ".join(part for part in block if part)
    return value


# --- canaries on the real stack -------------------------------------------------------------------


def runs(version: str, n: int, success: float, start: int, seed: int) -> list[dict]:
    return canary_runs("deploy-bot", version, n, success, start, seed)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """This module's stack, with its console: deploy tooling asks the canary endpoint."""
    yield from RunningStack(tmp_path_factory.mktemp("stack")).with_console().running()


@pytest.fixture(scope="module")
def canaries(stack):
    deployments = [
        {"agent_id": "deploy-bot", "version": "v1", "role": "stable", "traffic_pct": 100, "ts": T0},
        {"agent_id": "deploy-bot", "version": "v2-bad", "role": "canary", "traffic_pct": 20, "ts": T0 + 1},
    ]
    assert publish_lines(stack.settings, [orjson.dumps(d) for d in deployments], topic=topics.AGENT_DEPLOYMENTS.name,
                         key=agent_key).produced == 2
    stack.wait_for_count("SELECT count() FROM deployments WHERE agent_id = 'deploy-bot'", 2, timeout=30)
    events = runs("v1", 120, 0.95, T0 + 1000, 1) + runs("v2-bad", 60, 0.2, T0 + 1500, 2)
    events.sort(key=lambda e: e["ts"])
    assert publish_lines(stack.settings, [orjson.dumps(e) for e in events]).rejected == 0
    stack.wait_for_count("SELECT count() FROM rollbacks WHERE agent_id = 'deploy-bot'", 1, timeout=90)
    # a second canary after the rollback, with a few runs only: pending
    more = [{"agent_id": "deploy-bot", "version": "v3", "role": "canary", "traffic_pct": 10, "ts": T0 + 400_000}]
    assert publish_lines(stack.settings, [orjson.dumps(d) for d in more], topic=topics.AGENT_DEPLOYMENTS.name,
                         key=agent_key).produced == 1
    stack.wait_for_count("SELECT count() FROM deployments WHERE agent_id = 'deploy-bot'", 3, timeout=30)
    later = runs("v3", 5, 0.95, T0 + 401_000, 3) + runs("v1", 10, 0.95, T0 + 401_500, 4)
    later = [{**e, "run_id": "late-" + e["run_id"], "event_id": "late-" + e["event_id"]} for e in later]
    later.sort(key=lambda e: e["ts"])
    assert publish_lines(stack.settings, [orjson.dumps(e) for e in later]).rejected == 0
    stack.wait_for_count("SELECT count() FROM canaries WHERE agent_id = 'deploy-bot' AND version = 'v3'", 1, timeout=90)
    return stack


def test_argo_analysis_template_rolls_back_the_bad_canary_and_lets_the_pending_one_go_on(canaries):
    template = (INFRA / "argo" / "analysis-template.yaml").read_text()
    success, failure = yaml_scalar(template, "successCondition"), yaml_scalar(template, "failureCondition")
    url = yaml_scalar(template, "url")
    assert url.endswith("/api/v1/canaries/{{args.agent-id}}/{{args.version}}")
    assert yaml_scalar(template, "jsonPath") == "{$}"  # `result` is the whole JSON answer
    path = url.split("}}", 1)[1].replace("{{args.agent-id}}", "deploy-bot")

    status, bad = canaries.api(path.replace("{{args.version}}", "v2-bad"))
    assert status == 200 and bad["verdict"] == "rollback"
    assert evaluate(failure, bad) and not evaluate(success, bad)

    status, pending = canaries.api(path.replace("{{args.version}}", "v3"))
    assert status == 200 and pending["verdict"] == "pending"
    assert evaluate(success, pending) and not evaluate(failure, pending)
    # and a promoted canary would pass too
    assert evaluate(success, {**pending, "verdict": "promote"})


def test_versions_hold_the_deployments_roles_and_canary_verdicts(canaries):
    # deployment events without a config feed `versions` too (a view that failed would have sent
    # them to the dead letters, and the canary would never have been analysed)
    assert canaries.count("SELECT count() FROM dead_letters") == 0
    rows = {row["version"]: row for row in canaries.query(
        "SELECT version, roles, canary_verdict, config FROM versions WHERE agent_id = 'deploy-bot'")}
    assert (rows["v2-bad"]["roles"], rows["v2-bad"]["canary_verdict"], rows["v2-bad"]["config"]) == (
        ["canary"], "rollback", None)
    assert (rows["v3"]["canary_verdict"], rows["v1"]["roles"], rows["v1"]["canary_verdict"]) == ("pending", ["stable"], "")
    listing = canaries.cli("versions", "deploy-bot").stdout.decode()
    assert [line.split()[0] for line in listing.splitlines()[2:]] == ["v3", "v2-bad", "v1"]  # newest first
    assert "rollback" in listing.splitlines()[3] and listing.splitlines()[3].split()[-2] == "1"  # one rollback


def test_flagger_webhook_fails_on_the_rolled_back_canary_only(canaries):
    spec = (INFRA / "flagger" / "canary.yaml").read_text()
    command = yaml_scalar(spec, "cmd")
    assert command.startswith("curl --fail ") and "Authorization: Bearer" in command
    path = re.search(r"https?://[^/\s]+(/\S+)", command).group(1)
    assert path == "/api/v1/canaries/support-bot/v2/gate"
    gate = path.replace("support-bot", "deploy-bot").rsplit("/", 2)[0] + "/{version}/gate"
    # Flagger's rule (and curl --fail's): a 2xx answer passes the check, anything else fails it
    status, body = canaries.api(gate.format(version="v2-bad"))
    assert status == 409 and body["verdict"] == "rollback"
    status, body = canaries.api(gate.format(version="v3"))
    assert status == 200 and body["verdict"] == "pending"
    status, _ = canaries.api(gate.format(version="never-deployed"))
    assert status == 404
