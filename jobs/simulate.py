"""Deterministic simulated fleet of AI agents emitting Trackside agent events, with ground truth
(`truth`, `run_labels`) computed independently of any pipeline, to test one against."""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable, Iterable, Iterator

import orjson

PriceFn = Callable[[str, str, int, int, int], "float | None"]

DEFAULT_START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
HOUR_MS = 3_600_000

MIN_INPUT, MAX_INPUT = 500, 20_000
MIN_OUTPUT, MAX_OUTPUT = 20, 1_500
MIN_LLM_MS, MAX_LLM_MS = 300, 8_000
MIN_TOOL_MS, MAX_TOOL_MS = 20, 3_000
MAX_STEPS = 30
BURST_MS = 20_000  # arrivals of one burst spread over this much event time

# provider and generation speed (ms per output token); ids are ones genai-prices knows
MODELS: dict[str, tuple[str, float]] = {
    "gpt-4o": ("openai", 5.0),
    "gpt-4o-mini": ("openai", 3.5),
    "claude-sonnet-4-5": ("anthropic", 5.2),
    "claude-haiku-4-5": ("anthropic", 3.0),
}


def _model_info(model: str) -> tuple[str, float]:
    if model in MODELS:
        return MODELS[model]
    return ("anthropic" if model.startswith("claude") else "openai"), 5.0


# --- fleet description -------------------------------------------------------------------


@dataclass(frozen=True)
class VersionSpec:
    version: str
    share: float = 1.0  # relative traffic share among the agent's versions
    success_rate: float | None = None  # None: the agent's
    model: str | None = None  # None: the agent's
    cost_multiplier: float = 1.0  # scales tokens, so cost stays the true price of what is sent
    guardrail_multiplier: float = 1.0  # scales the per-run chance of each guardrail policy firing


@dataclass(frozen=True)
class GuardrailPolicy:
    """A guardrail of an agent (a `policy_hit` when it fires): its chance per run, before the
    version's guardrail_multiplier, and what it decides when it fires. `tool`: it checks that
    tool's calls (a run without one cannot trip it); None: it checks the model's output."""

    name: str
    rate: float
    decisions: tuple[tuple[str, float], ...]  # (blocked | warned | redacted | allowed, weight)
    tool: str | None = None


@dataclass(frozen=True)
class ApprovalGate:
    """A human gate: `share` of the calls of `tool` wait for an approval of `action`, which is
    granted before the call (the call follows the decision)."""

    tool: str
    action: str
    share: float


@dataclass(frozen=True)
class FailureFamily:
    """One way a run goes wrong; `at` is a tool of the agent's path, "llm", or None (no error event)."""

    name: str
    at: str | None
    error_type: str
    message: str  # str.format template over the call's args and n, k, big, model, tool
    outcome: str = "failure"
    status: str = "error"  # for tool families: "error" or "timeout"
    weight: float = 1.0
    # governance of its runs: this policy blocks the failing call, then an approval of this
    # action is asked and denied or expires (how a run comes to be escalated)
    blocked_by: str | None = None
    approval: str | None = None


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    model: str
    versions: tuple[VersionSpec, ...]
    path: tuple[tuple[str, int, int], ...]  # typical tool sequence: (tool, min calls, max calls)
    success_rate: float
    failures: tuple[FailureFamily, ...]
    weight: float = 1.0  # share of fleet traffic
    prompt_tokens: tuple[int, int] = (800, 2000)  # system prompt size
    decide_tokens: int = 60  # median output of a tool-choosing call
    answer_tokens: int = 350  # median output of the final answer
    task_prefix: str | None = None
    sessions: bool = False
    channels: tuple[str, ...] = ("api",)
    policies: tuple[GuardrailPolicy, ...] = ()
    approval_gates: tuple[ApprovalGate, ...] = ()
    approvers: tuple[str, ...] = ("oncall",)  # who decides its approvals

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for t, _, _ in self.path))


@dataclass(frozen=True)
class CanarySpec:
    """A new version of one agent that takes `share` of its runs from `start_ms` (default: mid-span)."""

    agent_id: str
    version: str
    share: float = 0.3
    start_ms: int | None = None
    success_rate: float | None = None  # None: the agent's
    cost_multiplier: float = 1.0
    model: str | None = None
    guardrail_multiplier: float = 1.0


def default_agents() -> tuple[AgentSpec, ...]:
    support = AgentSpec(
        agent_id="support-bot",
        model="gpt-4o-mini",
        versions=(
            VersionSpec("v1.4.2", share=0.8),
            VersionSpec("v1.5.0", share=0.2, model="claude-haiku-4-5", success_rate=0.88),
        ),
        path=(("get_customer", 0, 1), ("lookup_order", 1, 2), ("refund", 0, 1), ("send_email", 0, 1)),
        success_rate=0.85,
        failures=(
            FailureFamily("order_not_found", "lookup_order", "not_found",
                          "order #{order_id} not found", weight=0.4),
            FailureFamily("refund_over_limit", "refund", "policy_violation",
                          "refund of ${amount} for order #{order_id} exceeds auto-approval limit",
                          outcome="escalated", weight=0.35, blocked_by="refund_limit", approval="refund over $200"),
            FailureFamily("email_timeout", "send_email", "timeout",
                          "SMTP relay mx{k}.mail.example.com timed out after 3000 ms (message {n})",
                          status="timeout", weight=0.15),
            FailureFamily("user_abandoned", None, "", "", outcome="aborted", weight=0.1),
        ),
        weight=0.5,
        prompt_tokens=(1100, 1800),
        answer_tokens=180,
        sessions=True,
        channels=("web", "email", "slack"),
        policies=(
            GuardrailPolicy("pii_output", 0.045, (("redacted", 0.85), ("warned", 0.15))),
            GuardrailPolicy("toxicity", 0.008, (("warned", 0.6), ("blocked", 0.4))),
            GuardrailPolicy("refund_limit", 0.04, (("warned", 0.6), ("allowed", 0.4)), tool="refund"),
        ),
        approval_gates=(ApprovalGate("refund", "refund over $200", 0.2),),
        approvers=("maria.lopez", "sam.okafor", "support-leads"),
    )
    research = AgentSpec(
        agent_id="research-agent",
        model="claude-sonnet-4-5",
        versions=(VersionSpec("2.3.0"),),
        path=(("web_search", 1, 3), ("fetch_url", 1, 5), ("summarize", 1, 1)),
        success_rate=0.8,
        failures=(
            FailureFamily("fetch_blocked", "fetch_url", "http_403",
                          "HTTP 403 Forbidden fetching {url}", weight=0.4),
            FailureFamily("context_overflow", "llm", "context_length_exceeded",
                          "prompt is too long: {big} tokens > 200000 maximum", weight=0.3),
            FailureFamily("llm_rate_limit", "llm", "rate_limit",
                          "rate limit exceeded for {model}: {n} input tokens per minute, retry after {k}s",
                          weight=0.3),
        ),
        weight=0.25,
        prompt_tokens=(700, 1400),
        answer_tokens=600,
        task_prefix="RQ",
        channels=("api", "schedule"),
        policies=(
            GuardrailPolicy("prompt_injection", 0.02, (("blocked", 0.4), ("warned", 0.6)), tool="fetch_url"),
            GuardrailPolicy("copyright", 0.02, (("redacted", 0.6), ("warned", 0.4))),
            GuardrailPolicy("pii_output", 0.01, (("redacted", 0.9), ("warned", 0.1))),
        ),
    )
    coder = AgentSpec(
        agent_id="coder",
        model="gpt-4o",
        versions=(
            VersionSpec("0.9.3", share=0.6),
            VersionSpec("0.10.0", share=0.4, model="claude-sonnet-4-5", success_rate=0.76),
        ),
        path=(("search_code", 1, 2), ("read_file", 1, 4), ("edit_file", 1, 3), ("run_tests", 1, 1),
              ("edit_file", 0, 2), ("run_tests", 0, 1)),
        success_rate=0.7,
        failures=(
            FailureFamily("tests_failing", "run_tests", "test_failure",
                          "{k} tests failed in {target}", weight=0.5),
            FailureFamily("file_not_found", "read_file", "not_found",
                          "FileNotFoundError: [Errno 2] No such file or directory: '{path}'", weight=0.2),
            FailureFamily("patch_conflict", "edit_file", "conflict",
                          "patch hunk #{k} failed to apply to {path} at line {start_line}", weight=0.2),
            FailureFamily("tests_hang", "run_tests", "timeout",
                          "pytest run of {target} exceeded 3000 ms", outcome="aborted",
                          status="timeout", weight=0.1),
        ),
        weight=0.25,
        prompt_tokens=(1800, 3200),
        decide_tokens=90,
        answer_tokens=450,
        task_prefix="PR-",
        sessions=True,
        channels=("ci", "ide"),
        policies=(
            GuardrailPolicy("secrets", 0.035, (("redacted", 0.9), ("warned", 0.1)), tool="read_file"),
            GuardrailPolicy("protected_path", 0.02, (("warned", 0.7), ("allowed", 0.3)), tool="edit_file"),
            GuardrailPolicy("unsafe_code", 0.008, (("warned", 0.75), ("blocked", 0.25))),
        ),
        approval_gates=(ApprovalGate("edit_file", "change to a protected path", 0.04),),
        approvers=("dana.kim", "li.wei", "codeowners"),
    )
    return (support, research, coder)


# the demo's canary: worse, dearer, and its new prompt trips the guardrails four times as often
DEFAULT_CANARY = CanarySpec("support-bot", "v1.6.0-rc1", share=0.3, success_rate=0.6, cost_multiplier=1.5,
                            guardrail_multiplier=4.0)

DEFAULT_TENANTS = (("acme", 0.45), ("globex", 0.3), ("initech", 0.15), ("umbrella", 0.1))


@dataclass
class FleetConfig:
    seed: int = 7
    runs: int = 500
    start_ms: int = DEFAULT_START_MS
    duration_ms: int = 2 * HOUR_MS
    agents: tuple[AgentSpec, ...] = field(default_factory=default_agents)
    timeout_fraction: float = 0.02  # runs that never send run_end
    loop_fraction: float = 0.03  # runs that repeat one tool call with the same args 3-5 times
    loop_repeats: tuple[int, int] = (3, 5)  # how many times a loop repeats its call (least, most)
    tool_args: bool = True  # whether tool calls carry their arguments (off: what instrumentation sends by default)
    canary: CanarySpec | None = None
    price_fn: PriceFn | None = None
    cost_fraction: float = 0.3  # llm_calls that report cost_usd (only with price_fn)
    burst_fraction: float = 0.4  # runs that arrive in bursts (CI, campaigns), so many overlap
    tool_error_rate: float = 0.03  # transient tool errors, retried once with the same args
    llm_error_rate: float = 0.02  # transient rate limits, retried
    staging_fraction: float = 0.05
    tenants: tuple[tuple[str, float], ...] = DEFAULT_TENANTS
    # approval, policy_hit and feedback events (SPEC §4), from a random stream of their own: on
    # or off, the other events of a seed are the same
    governance: bool = True
    feedback_fraction: float = 0.25  # runs with a run_end that get a feedback event
    # feedback comes up to this long after run_end (0: at its event time). Later feedback
    # stretches the run's ended_at in the assembler (streams/detect/runs.py), so 0 by default
    feedback_delay_ms: int = 0


# --- tools ---------------------------------------------------------------------------------

_TOPICS = ("battery recycling", "llm evaluation", "heat pumps", "async runtimes", "solid-state batteries",
           "carbon capture", "vector databases", "protein folding", "grid storage", "open-source licensing")
_ASPECTS = ("market size 2026", "recent benchmarks", "regulation in the EU", "key players", "cost trends")
_DOMAINS = ("arxiv.org", "en.wikipedia.org", "www.nature.com", "github.com", "www.reuters.com", "news.ycombinator.com")
_MODULES = ("billing", "auth", "ingest", "scheduler", "api", "storage", "metrics")
_FILES = ("models", "service", "handlers", "utils", "client", "schema", "config", "cache", "tasks")
_SYMBOLS = ("parse_invoice", "refresh_token", "retry_policy", "flush_batch", "resolve_user", "rate_limiter")


def _args_get_customer(rng, e, k):
    return {"customer_id": e["customer"]} if k == 0 else {"customer_id": e["customer"], "page": k + 1}


def _args_lookup_order(rng, e, k):
    return {"order_id": str(e["order"] + 17 * k), "customer_id": e["customer"]}


def _args_refund(rng, e, k):
    return {"order_id": str(e["order"] + 17 * k), "amount": round(rng.uniform(8, 450), 2),
            "reason": rng.choice(("damaged", "late_delivery", "wrong_item", "not_received"))}


def _args_send_email(rng, e, k):
    return {"to": f"{e['customer']}@customers.example.com",
            "template": ("order_status", "refund_confirmation", "apology")[(e["n"] + k) % 3]}


def _args_web_search(rng, e, k):
    return {"query": e["query"], "page": k + 1}  # pagination: same query, next page, not a loop


def _args_fetch_url(rng, e, k):
    return {"url": f"https://{_DOMAINS[(e['n'] + k) % len(_DOMAINS)]}/articles/{e['doc'] + 31 * k}"}


def _args_summarize(rng, e, k):
    return {"doc_ids": [f"doc_{e['doc'] + 31 * i}" for i in range(1 + e["n"] % 5)], "max_words": 200 + 100 * k}


def _args_read_file(rng, e, k):
    return {"path": f"src/{e['module']}/{_FILES[(e['n'] + k) % len(_FILES)]}.py"}


def _args_edit_file(rng, e, k):
    start = rng.randint(10, 400)
    return {"path": f"src/{e['module']}/{_FILES[(e['n'] + k) % len(_FILES)]}.py",
            "start_line": start, "end_line": start + rng.randint(1, 40)}


def _args_run_tests(rng, e, k):
    target = f"tests/test_{e['module']}.py"
    return {"target": target if k == 0 else f"{target}::test_{e['symbol']}_{k}"}


def _args_search_code(rng, e, k):
    return {"pattern": f"def {_SYMBOLS[(e['n'] + k) % len(_SYMBOLS)]}", "repo": f"{e['module']}-service"}


@dataclass(frozen=True)
class ToolProfile:
    median_ms: float
    sigma: float
    result_tokens: tuple[int, int]  # what the result adds to the conversation
    args: Callable[[random.Random, dict, int], dict]  # k-th call of the tool in a run; distinct k, distinct args
    error_type: str  # of its transient errors
    error_message: str

    @property
    def mu(self) -> float:
        return math.log(self.median_ms)


TOOLS: dict[str, ToolProfile] = {
    "get_customer": ToolProfile(70, 0.5, (150, 400), _args_get_customer, "upstream_error",
                                "crm-api returned 503 for customer {customer_id} (request req_{n})"),
    "lookup_order": ToolProfile(120, 0.5, (200, 600), _args_lookup_order, "upstream_error",
                                "orders-api returned 502 for order #{order_id} (request req_{n})"),
    "refund": ToolProfile(450, 0.4, (60, 150), _args_refund, "upstream_error",
                          "payments-api 503 while refunding order #{order_id} (trace {n})"),
    "send_email": ToolProfile(300, 0.4, (40, 80), _args_send_email, "upstream_error",
                              "smtp relay mx{k}.mail.example.com returned 451 for message {n}"),
    "web_search": ToolProfile(700, 0.4, (500, 1500), _args_web_search, "rate_limited",
                              "search API returned 429, retry after {k}s (request {n})"),
    "fetch_url": ToolProfile(900, 0.6, (800, 2500), _args_fetch_url, "http_error",
                             "HTTP 503 fetching {url}"),
    "summarize": ToolProfile(1500, 0.3, (200, 600), _args_summarize, "upstream_error",
                             "summarizer worker {k} crashed on batch {n}"),
    "read_file": ToolProfile(35, 0.5, (300, 2000), _args_read_file, "io_error",
                             "EIO reading {path} at offset {n}"),
    "edit_file": ToolProfile(45, 0.5, (50, 200), _args_edit_file, "io_error",
                             "could not lock {path}: held by pid {n}"),
    "run_tests": ToolProfile(2200, 0.25, (300, 1500), _args_run_tests, "test_infra_error",
                             "pytest worker gw{k} crashed with signal 9 (job {n})"),
    "search_code": ToolProfile(220, 0.5, (200, 800), _args_search_code, "upstream_error",
                               "code index shard {k} unavailable (request {n})"),
}

POLICY_DECISIONS = ("blocked", "warned", "redacted", "allowed")
APPROVAL_STATUSES = ("requested", "granted", "denied", "expired")
# request to decision of an approval, lognormal: a median of 2.5 s, a long tail. The run's
# other events keep their times, so a wait is cut to the time the run gives it: from the run's
# start to the gated call (the agent asks, then carries on), or from a blocked call to the next
APPROVAL_WAIT_MEDIAN_MS, APPROVAL_WAIT_SIGMA = 2_500, 0.9
_NORMAL = NormalDist()

_LLM_RATE_LIMIT = ("rate_limit", "rate limit exceeded for {model}: {n} input tokens per minute, retry after {k}s")
_LOOP_FAMILY = "tool_loop"


# --- planning: everything decided per run, before any event exists --------------------------


@dataclass(frozen=True)
class _RunPlan:
    order: int
    run_id: str
    start_ms: int
    agent: AgentSpec
    version: str
    model: str
    cost_multiplier: float
    canary: bool
    timeout: bool
    loop: bool
    outcome: str  # planned; "timeout" for runs without run_end
    family: FailureFamily | None
    ctx: dict  # run-level fields every event carries
    seed: int
    guardrail_multiplier: float = 1.0


def _uuid(bits: Callable[[int], int]) -> str:
    h = "%032x" % bits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _pick(u: float, weights: list[float]) -> int:
    total = sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w / total
        if u < acc:
            return i
    return len(weights) - 1


def _validate(cfg: FleetConfig) -> None:
    if cfg.runs < 0 or cfg.duration_ms <= 0:
        raise ValueError("runs must be >= 0 and duration_ms > 0")
    for name in ("timeout_fraction", "loop_fraction", "cost_fraction", "burst_fraction",
                 "tool_error_rate", "llm_error_rate", "staging_fraction", "feedback_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]")
    if cfg.timeout_fraction + cfg.loop_fraction > 1.0:
        raise ValueError("timeout_fraction + loop_fraction must be <= 1")
    if cfg.feedback_delay_ms < 0:
        raise ValueError("feedback_delay_ms must be >= 0")
    if not cfg.agents:
        raise ValueError("at least one agent is needed")
    for a in cfg.agents:
        if not a.versions or not a.path:
            raise ValueError(f"{a.agent_id}: needs versions and a path")
        unknown = [t for t in a.tools if t not in TOOLS]
        if unknown:
            raise ValueError(f"{a.agent_id}: tools without a profile: {unknown}")
        for f in a.failures:
            if f.at not in (None, "llm") and f.at not in a.tools:
                raise ValueError(f"{a.agent_id}: failure {f.name} at {f.at}, which is not on its path")
            if (f.blocked_by or f.approval) and f.at in (None, "llm"):
                raise ValueError(f"{a.agent_id}: failure {f.name} is governed, so it needs a tool call to fail")
        for policy in a.policies:
            if policy.tool is not None and policy.tool not in a.tools:
                raise ValueError(f"{a.agent_id}: policy {policy.name} checks {policy.tool}, which is not on its path")
            if not 0.0 <= policy.rate <= 1.0 or not policy.decisions:
                raise ValueError(f"{a.agent_id}: policy {policy.name} needs a rate in [0, 1] and decisions")
            wrong = [d for d, _ in policy.decisions if d not in POLICY_DECISIONS]
            if wrong:
                raise ValueError(f"{a.agent_id}: policy {policy.name} decides {wrong}, not one of {POLICY_DECISIONS}")
        for gate in a.approval_gates:
            if gate.tool not in a.tools or not 0.0 <= gate.share <= 1.0:
                raise ValueError(f"{a.agent_id}: approval gate on {gate.tool} needs a tool of its path "
                                 "and a share in [0, 1]")
        if not a.approvers:
            raise ValueError(f"{a.agent_id}: needs at least one approver")
        if any(v.guardrail_multiplier < 0 for v in a.versions):
            raise ValueError(f"{a.agent_id}: guardrail_multiplier must be >= 0")
    if cfg.canary and cfg.canary.agent_id not in {a.agent_id for a in cfg.agents}:
        raise ValueError(f"canary agent {cfg.canary.agent_id} is not in the fleet")
    if cfg.canary and cfg.canary.guardrail_multiplier < 0:
        raise ValueError("canary guardrail_multiplier must be >= 0")


def _plan(cfg: FleetConfig) -> list[_RunPlan]:
    _validate(cfg)
    rng = random.Random(cfg.seed)
    rand = rng.random
    start, span = cfg.start_ms, cfg.duration_ms
    end = start + span
    n_bursts = max(1, cfg.runs // 40)
    bursts = [start + int(rand() * span) for _ in range(n_bursts)]
    canary = cfg.canary
    canary_start = (canary.start_ms if canary and canary.start_ms is not None else start + span // 2)
    agent_weights = [a.weight for a in cfg.agents]
    tenant_names = [t for t, _ in cfg.tenants]
    tenant_weights = [w for _, w in cfg.tenants]
    plans = []
    for i in range(cfg.runs):
        # a fixed block of draws per run, so changing one knob (e.g. the canary) leaves other runs alone
        u_kind, u_time, u_burst, u_agent, u_version, u_canary, u_outcome, u_family, u_tenant, u_env, u_ctx = (
            rand() for _ in range(11))
        run_id = _uuid(rng.getrandbits)
        seed = rng.getrandbits(64)

        timeout = u_kind < cfg.timeout_fraction
        loop = not timeout and u_kind < cfg.timeout_fraction + cfg.loop_fraction
        if timeout:
            # early enough that an idle timeout closes it while the stream still runs
            t = start + int(u_time * span * 0.4)
        elif u_burst < cfg.burst_fraction:
            t = min(end - 1, bursts[int(u_time * n_bursts)] + int(u_burst / cfg.burst_fraction * BURST_MS))
        else:
            t = start + int(u_time * span)

        agent = cfg.agents[_pick(u_agent, agent_weights)]
        vspec = agent.versions[_pick(u_version, [v.share for v in agent.versions])]
        version, model = vspec.version, vspec.model or agent.model
        success_rate = agent.success_rate if vspec.success_rate is None else vspec.success_rate
        mult, guardrails, is_canary = vspec.cost_multiplier, vspec.guardrail_multiplier, False
        if canary and canary.agent_id == agent.agent_id and t >= canary_start and u_canary < canary.share:
            version, model, is_canary = canary.version, canary.model or agent.model, True
            success_rate = agent.success_rate if canary.success_rate is None else canary.success_rate
            mult, guardrails = canary.cost_multiplier, canary.guardrail_multiplier

        family = None
        if timeout:
            outcome = "timeout"
        elif loop:
            outcome = "aborted" if u_outcome < 0.6 else "failure"
        elif u_outcome < success_rate or not agent.failures:
            outcome = "success"
        else:
            family = agent.failures[_pick(u_family, [f.weight for f in agent.failures])]
            outcome = family.outcome

        ctx = {"run_id": run_id, "agent_id": agent.agent_id, "agent_version": version}
        if agent.task_prefix:
            ctx["task_id"] = f"{agent.task_prefix}{1000 + int(u_ctx * 9000)}"
        if agent.sessions:
            # a pool smaller than the run count, so sessions hold several runs
            ctx["session_id"] = f"sess_{int(u_ctx * 1e9) % max(1, cfg.runs // 2):06d}"
        ctx["tenant"] = tenant_names[_pick(u_tenant, tenant_weights)]
        ctx["environment"] = "staging" if u_env < cfg.staging_fraction else "prod"
        plans.append(_RunPlan(i, run_id, t, agent, version, model, mult, is_canary, timeout, loop, outcome,
                              family, ctx, seed, guardrails))
    return plans


def run_labels(config: FleetConfig) -> dict[str, dict]:
    """Ground truth per run_id, from the plan alone (no events needed)."""
    return {
        p.run_id: {
            "agent_id": p.agent.agent_id,
            "agent_version": p.version,
            "canary": p.canary,
            "loop": p.loop,
            "timeout": p.timeout,
            "outcome": p.outcome,
            "failure_family": _LOOP_FAMILY if p.loop else (p.family.name if p.family else None),
            "start_ms": p.start_ms,
        }
        for p in _plan(config)
    }


# --- one run's events --------------------------------------------------------------------------


def _run_events(p: _RunPlan, cfg: FleetConfig) -> list[dict]:
    events = _core_events(p, cfg)
    return _with_governance(p, cfg, events) if cfg.governance else events


def _core_events(p: _RunPlan, cfg: FleetConfig) -> list[dict]:
    """run_start, llm_call, tool_call and run_end: the run itself."""
    rng = random.Random(p.seed)
    rand, randint, lognorm, bits = rng.random, rng.randint, rng.lognormvariate, rng.getrandbits
    agent, fam, model, mult, ctx = p.agent, p.family, p.model, p.cost_multiplier, p.ctx
    provider, ms_per_token = _model_info(model)
    price_fn, cost_fraction = cfg.price_fn, cfg.cost_fraction
    ln_decide, ln_answer = math.log(agent.decide_tokens), math.log(agent.answer_tokens)

    ent = {"customer": f"cus_{randint(100000, 999999)}", "order": randint(10000, 97000),
           "query": f"{rng.choice(_TOPICS)} {rng.choice(_ASPECTS)}", "doc": randint(1000, 90000),
           "module": rng.choice(_MODULES), "symbol": rng.choice(_SYMBOLS), "n": randint(0, 1000)}

    # the tool calls this run makes, as (tool, k-th call of that tool)
    calls: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for tool, lo, hi in agent.path:
        if fam is not None and fam.at == tool and lo == 0 and tool not in seen:
            lo = 1
        for _ in range(randint(lo, hi)):
            k = seen.get(tool, 0)
            seen[tool] = k + 1
            calls.append((tool, k))
    if not calls:  # every segment drew zero calls; a run still does one thing
        calls.append((agent.path[0][0], 0))

    loop_at = trigger_at = -1
    llm_fail = 0
    if p.loop:
        reps = randint(*cfg.loop_repeats)
        loop_at = rng.randrange(min(len(calls), (MAX_STEPS - 2 * reps) // 2 + 1))
        calls = calls[: loop_at + 1]  # the loop guard aborts the run right after it
        base_steps = 2 * loop_at + 2 * reps
    elif fam is not None and fam.at == "llm":
        llm_fail = 1 if fam.error_type != "rate_limit" else randint(2, 3)  # retries that also fail
        calls = calls[: randint(1, min(len(calls), (MAX_STEPS - llm_fail) // 2))]
        base_steps = 2 * len(calls) + llm_fail
    else:
        if fam is not None and fam.at is not None:
            trigger_at = next(i for i, (t, _) in enumerate(calls) if t == fam.at)
            calls = calls[: trigger_at + 1]
            if len(calls) > (MAX_STEPS - 1) // 2:
                calls = calls[: (MAX_STEPS - 1) // 2 - 1] + calls[-1:]
                trigger_at = len(calls) - 1
        elif fam is not None:  # no error event: the user left after an intermediate answer
            calls = calls[: randint(1, len(calls))]
        calls = calls[: (MAX_STEPS - 1) // 2]
        base_steps = 2 * len(calls) + 1
    spare = MAX_STEPS - base_steps  # room for transient retries

    events: list[dict] = []
    t = p.start_ms
    system = randint(*agent.prompt_tokens)
    conv = system + randint(30, 400)
    prev_in = system  # a cached prefix can be the system prompt, shared across runs

    def new(type_: str, ts: int) -> dict:
        ev = {"event_id": _uuid(bits), "ts": ts, "type": type_}
        ev.update(ctx)
        return ev

    def fmt(template: str, args: dict | None, tool: str = "") -> str:
        return template.format(**(args or {}), n=randint(1000, 99999), k=randint(2, 60),
                               big=randint(200_001, 400_000), model=model, tool=tool)

    def llm(answer: bool, error: tuple[str, str] | None = None, repeat: dict | None = None) -> None:
        nonlocal t, conv, prev_in
        if error is None:
            inp = min(MAX_INPUT, int(min(conv, MAX_INPUT) * mult))
            out = int(lognorm(ln_answer if answer else ln_decide, 0.6) * mult)
            out = MIN_OUTPUT if out < MIN_OUTPUT else MAX_OUTPUT if out > MAX_OUTPUT else out
            if repeat is not None:  # the same call written again: the same tokens (drawn all the same)
                out = repeat.setdefault("output", out)
            # providers cache the prompt prefix in 128-token blocks once it passes 1024 tokens
            cached = (min(prev_in, inp) // 128) * 128 if prev_in >= 1024 and rand() < 0.85 else 0
            # time to first token grows with the prompt, the rest with the output
            lat = int(lognorm(6.2, 0.35) + inp * 0.04 + out * ms_per_token * (0.85 + 0.4 * rand()))
            lat = MIN_LLM_MS if lat < MIN_LLM_MS else MAX_LLM_MS if lat > MAX_LLM_MS else lat
        else:
            inp = out = cached = 0  # providers bill nothing for a rejected request
            lat = randint(MIN_LLM_MS, 700)
        t += lat
        ev = new("llm_call", t)
        ev["model"] = model
        ev["provider"] = provider
        ev["input_tokens"] = inp
        ev["output_tokens"] = out
        ev["cache_read_input_tokens"] = cached
        ev["latency_ms"] = lat
        if error is None:
            ev["status"] = "ok"
            conv += out
            prev_in = inp
        else:
            ev["status"] = "error"
            ev["error_type"], ev["error_message"] = error
        # drawn even without price_fn, so adding prices changes nothing else in the stream
        if rand() < cost_fraction and price_fn is not None:
            cost = price_fn(model, provider, inp, out, cached)
            if cost is not None:
                ev["cost_usd"] = float(cost)
        events.append(ev)

    def tool_call(name: str, args: dict, status: str = "ok", error: tuple[str, str] | None = None,
                  repeat: dict | None = None) -> None:
        nonlocal t, conv
        prof = TOOLS[name]
        if status == "timeout":
            lat = MAX_TOOL_MS
        else:
            lat = int(lognorm(prof.mu, prof.sigma))
            lat = MIN_TOOL_MS if lat < MIN_TOOL_MS else MAX_TOOL_MS if lat > MAX_TOOL_MS else lat
        t += lat
        ev = new("tool_call", t)
        ev["tool"] = name
        if cfg.tool_args:
            ev["args"] = args
        ev["status"] = status
        ev["latency_ms"] = lat
        if status != "ok":
            ev["error_type"], ev["error_message"] = error
            conv += 60
        else:
            lo, hi = prof.result_tokens
            result = randint(lo, hi)
            conv += result if repeat is None else repeat.setdefault("result", result)  # the same call, the same result
        events.append(ev)

    ev = new("run_start", t)
    ev["attributes"] = {"channel": rng.choice(agent.channels)}
    events.append(ev)

    run_error: tuple[str, str] | None = None
    for i, (name, k) in enumerate(calls):
        prof = TOOLS[name]
        args = prof.args(rng, ent, k)
        if i == loop_at:
            err = None
            if rand() < 0.5:  # half the loops retry a failing call, half ignore an unhelpful result
                err = ("timeout", fmt("{tool} timed out after 3000 ms (request {n})", args, name)) \
                    if rand() < 0.3 else (prof.error_type, fmt(prof.error_message, args, name))
            status = "ok" if err is None else ("timeout" if err[0] == "timeout" else "error")
            repeat: dict = {}  # one call made again: what the model writes and the tool returns, each time
            for _ in range(reps):
                llm(False, repeat=repeat)
                tool_call(name, dict(args), status, err, repeat=repeat)
            run_error = ("loop_detected", f"stopped after {reps} identical {name} calls")
            break
        if spare > 0 and rand() < cfg.llm_error_rate:
            llm(False, (_LLM_RATE_LIMIT[0], fmt(_LLM_RATE_LIMIT[1], None)))
            spare -= 1
        llm(False)
        if i == trigger_at:
            run_error = (fam.error_type, fmt(fam.message, args, name))
            tool_call(name, args, fam.status, run_error)
            continue
        if spare > 0 and rand() < cfg.tool_error_rate:
            # a framework-level retry: the same call twice in a row, which is not a loop
            if rand() < 0.3:
                tool_call(name, args, "timeout", ("timeout", fmt("{tool} timed out after 3000 ms (request {n})",
                                                                 args, name)))
            else:
                tool_call(name, args, "error", (prof.error_type, fmt(prof.error_message, args, name)))
            spare -= 1
            args = dict(args)
        tool_call(name, args)

    if llm_fail:
        run_error = (fam.error_type, fmt(fam.message, None))
        for _ in range(llm_fail):
            llm(False, run_error)
    elif not p.loop:
        llm(True)

    if p.timeout:
        # the process died somewhere mid-run; never past mid-span, so an idle timeout can close it
        keep = randint(2, max(2, len(events) - 1))
        mid = cfg.start_ms + cfg.duration_ms // 2
        return [e for e in events[:keep] if e["ts"] < mid] or events[:1]

    t += randint(1, 40)
    ev = new("run_end", t)
    ev["outcome"] = p.outcome
    if rand() < 0.6:  # only some runs get an evaluator score
        ev["score"] = round(0.7 + 0.3 * rand() if p.outcome == "success" else 0.45 * rand(), 3)
    if p.outcome == "failure":
        ev["error_type"], ev["error_message"] = run_error
    events.append(ev)
    return events


def _approval_wait_ms(u: float) -> int:
    z = _NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
    return int(APPROVAL_WAIT_MEDIAN_MS * math.exp(APPROVAL_WAIT_SIGMA * z))


def _with_governance(p: _RunPlan, cfg: FleetConfig, core: list[dict]) -> list[dict]:
    """The run's events with its guardrail hits, approvals and feedback put in, in event-time order.

    They come from random streams of the run's own (decisions, ids), with a fixed number of
    draws per policy, gate call and run, so the core events stay as they are and one knob (a
    multiplier, the feedback share) changes nothing of the others. Each lies between the run's
    start and its end (feedback: at run_end or up to feedback_delay_ms after), so a run's span
    is its core events' span.
    """
    rng = random.Random(f"governance:{p.seed}")
    rand = rng.random
    ids = random.Random(f"governance-ids:{p.seed}").getrandbits
    agent, ctx, last = p.agent, p.ctx, len(core) - 1
    times = [e["ts"] for e in core]
    added: list[tuple[int, int, dict]] = []  # (index of the core event it follows, ts, event)

    def add(after: int, ts: int, type_: str, fields: dict) -> None:
        ev = {"event_id": _uuid(ids), "ts": ts, "type": type_}
        ev.update(ctx)
        ev.update((k, v) for k, v in fields.items() if v is not None)
        added.append((after, ts, ev))

    def just_after(i: int, u: float) -> int:
        """A time after core event i and before the next one; i's own when there is no room."""
        room = times[i + 1] - times[i] - 1 if i < last else 0
        return times[i] + 1 + int(u * room) if room > 0 else times[i]

    llm_ok = [i for i, e in enumerate(core) if e["type"] == "llm_call" and e["status"] == "ok"]
    calls: dict[str, list[int]] = {}
    for i, e in enumerate(core):
        if e["type"] == "tool_call":
            calls.setdefault(e["tool"], []).append(i)

    # guardrails: each fires on one of the calls it checks, with its chance per run
    for policy in agent.policies:
        u_hit, u_decision, u_host, u_ts = rand(), rand(), rand(), rand()
        hosts = llm_ok if policy.tool is None else calls.get(policy.tool, ())
        if hosts and u_hit < policy.rate * p.guardrail_multiplier:
            host = hosts[int(u_host * len(hosts))]
            decision = policy.decisions[_pick(u_decision, [w for _, w in policy.decisions])][0]
            add(host, just_after(host, u_ts), "policy_hit",
                {"policy": policy.name, "decision": decision, "tool": policy.tool})

    # a governed failure: its failing call blocked, an approval asked at once and refused
    # (denied, or expired) before the run's next event
    fam, failing = p.family, None
    u_wait, u_status, u_who = rand(), rand(), rand()
    if fam is not None and (fam.blocked_by or fam.approval):
        failing = next((i for i in reversed(calls.get(fam.at, ())) if core[i]["status"] != "ok"), None)
        if failing is not None and failing < last and times[failing + 1] - times[failing] > 3:
            t0 = times[failing]
            if fam.blocked_by:
                add(failing, t0 + 1, "policy_hit", {"policy": fam.blocked_by, "decision": "blocked", "tool": fam.at})
            if fam.approval:
                asked = t0 + 2
                decided = asked + max(1, min(_approval_wait_ms(u_wait), times[failing + 1] - 1 - asked))
                denied = u_status < 0.75
                add(failing, asked, "approval", {"status": "requested", "action": fam.approval})
                add(failing, decided, "approval", {
                    "status": "denied" if denied else "expired", "action": fam.approval,
                    "approver": agent.approvers[int(u_who * len(agent.approvers))] if denied else None,
                    "wait_ms": decided - asked})

    # human gates: asked before the gated call (the agent carries on meanwhile), granted while
    # the model call that chose the gated call runs, so the call and all after it follow the decision
    for gate in agent.approval_gates:
        for j in calls.get(gate.tool, ()):
            u_need, u_wait, u_at, u_who = rand(), rand(), rand(), rand()
            if j == failing or core[j - 1]["type"] != "llm_call" or u_need >= gate.share:
                continue  # a retry of a call is covered by its first attempt's approval
            lo, hi = times[j - 2], times[j - 1]  # hi - lo: a model call's latency, >= 300 ms
            decided = lo + 2 + int(u_at * (hi - lo - 3))
            asked = min(decided - 1, max(times[0] + 1, decided - _approval_wait_ms(u_wait)))
            add(bisect.bisect_right(times, asked) - 1, asked, "approval",
                {"status": "requested", "action": gate.action})
            add(j - 2, decided, "approval", {
                "status": "granted", "action": gate.action,
                "approver": agent.approvers[int(u_who * len(agent.approvers))], "wait_ms": decided - asked})

    # feedback on a share of the runs that ended: a user's thumbs or an online evaluator's
    # score, both following the run's success
    u_feedback, u_source, u_score, u_delay = rand(), rand(), rand(), rand()
    end = core[last]
    if end["type"] == "run_end" and u_feedback < cfg.feedback_fraction:
        success = end["outcome"] == "success"
        if u_source < 0.6:
            up = u_score < (0.85 if success else 0.2)
            fields = {"score": 1.0 if up else 0.0, "label": "thumbs_up" if up else "thumbs_down", "source": "user"}
        else:
            score = round(0.35 + 0.65 * u_score ** 0.5 if success else 0.7 * u_score ** 1.5, 3)
            fields = {"score": score, "label": "pass" if score >= 0.5 else "fail", "source": "eval"}
        add(last, end["ts"] + int(u_delay * cfg.feedback_delay_ms), "feedback", fields)

    if not added:
        return core
    added.sort(key=lambda a: (a[0], a[1]))  # stable: on a tie, the order they were made in
    out, k = [], 0
    for i, ev in enumerate(core):
        out.append(ev)
        while k < len(added) and added[k][0] == i:
            out.append(added[k][2])
            k += 1
    return out


# --- public API -------------------------------------------------------------------------------------


def simulate(config: FleetConfig | None = None) -> Iterator[dict]:
    """Yield the fleet's events in global event-time order (ties: run order, then position in run)."""
    cfg = config or FleetConfig()
    plans = sorted(_plan(cfg), key=lambda p: (p.start_ms, p.order))
    heap: list[tuple[int, int, int, dict]] = []
    push, pop = heapq.heappush, heapq.heappop
    i, n = 0, len(plans)
    while i < n or heap:
        # a run is generated only once the merge reaches its start, so memory follows concurrency
        while i < n and (not heap or plans[i].start_ms <= heap[0][0]):
            p = plans[i]
            for seq, ev in enumerate(_run_events(p, cfg)):
                push(heap, (ev["ts"], p.order, seq, ev))
            i += 1
        yield pop(heap)[3]


def _loop_in(tool_calls: list[tuple[int, str, str]], threshold: int = 3) -> bool:
    streak, last = 0, None
    for _, tool, args in sorted(tool_calls):
        key = (tool, args)
        streak = streak + 1 if key == last else 1
        last = key
        if streak >= threshold:
            return True
    return False


def truth(events: Iterable[dict], price_fn: PriceFn | None = None,
          labels: dict[str, dict] | None = None) -> dict:
    """Expected results, from the events alone.

    Cost of an llm_call is its cost_usd, else price_fn(...); calls with neither are counted as unpriced.
    A run's loop flag comes from `labels` when given, else from the definition (>= 3 identical
    tool calls in a row). Returns {"groups": {(agent_id, agent_version): {...}}, "runs": {run_id: {...}}}.
    A run's `events` counts every event of it (distinct ids); its governance: `policy_hits`
    ("policy:decision" -> count), `approvals` (status -> count), `approval_waits_ms` (of the
    decisions, as they come), `feedback` (count) and `feedback_score` (their mean, None without).
    """
    acc: dict[str, dict] = {}
    for ev in events:
        r = acc.get(ev["run_id"])
        if r is None:
            r = acc[ev["run_id"]] = {"agent_id": ev["agent_id"], "agent_version": ev["agent_version"],
                                     "outcome": None, "steps": 0, "costs": [], "unpriced": 0, "tools": [],
                                     "ids": set(), "policy_hits": {}, "approvals": dict.fromkeys(APPROVAL_STATUSES, 0),
                                     "waits": [], "scores": []}
        if ev["event_id"] in r["ids"]:
            continue  # a redelivery counts once
        r["ids"].add(ev["event_id"])
        kind = ev["type"]
        if kind == "llm_call":
            r["steps"] += 1
            cost = ev.get("cost_usd")
            if cost is None and price_fn is not None:
                cost = price_fn(ev["model"], ev["provider"], ev["input_tokens"], ev["output_tokens"],
                                ev.get("cache_read_input_tokens", 0))
            if cost is None:
                r["unpriced"] += 1
            else:
                r["costs"].append(float(cost))
        elif kind == "tool_call":
            r["steps"] += 1
            r["tools"].append((ev["ts"], ev["tool"], json.dumps(ev.get("args"), sort_keys=True)))
        elif kind == "run_end":
            r["outcome"] = ev["outcome"]
        elif kind == "policy_hit":
            key = f"{ev.get('policy', '')}:{ev.get('decision', '')}"
            r["policy_hits"][key] = r["policy_hits"].get(key, 0) + 1
        elif kind == "approval":
            status = ev.get("status")
            if status in r["approvals"]:
                r["approvals"][status] += 1
            if ev.get("wait_ms") is not None:
                r["waits"].append(ev["wait_ms"])
        elif kind == "feedback" and ev.get("score") is not None:
            r["scores"].append(ev["score"])

    runs: dict[str, dict] = {}
    groups: dict[tuple[str, str], dict] = {}
    for run_id, r in acc.items():
        loop = labels[run_id]["loop"] if labels is not None and run_id in labels else _loop_in(r["tools"])
        cost = math.fsum(r["costs"])
        scores = r["scores"]
        run = {"agent_id": r["agent_id"], "agent_version": r["agent_version"],
               "outcome": r["outcome"] or "timeout", "steps": r["steps"], "loop": loop,
               "cost_usd": cost, "unpriced_llm_calls": r["unpriced"], "events": len(r["ids"]),
               "policy_hits": r["policy_hits"], "approvals": r["approvals"], "approval_waits_ms": r["waits"],
               "feedback": len(scores), "feedback_score": math.fsum(scores) / len(scores) if scores else None}
        runs[run_id] = run
        g = groups.setdefault((r["agent_id"], r["agent_version"]), {
            "runs": 0, "successes": 0, "outcomes": {}, "loops": 0, "costs": [], "unpriced_llm_calls": 0,
            "events": 0, "runs_with_policy_hit": 0, "policy_hits": {},
            "approvals": dict.fromkeys(APPROVAL_STATUSES, 0), "approval_waits_ms": [], "feedback_scores": []})
        g["runs"] += 1
        g["successes"] += run["outcome"] == "success"
        g["outcomes"][run["outcome"]] = g["outcomes"].get(run["outcome"], 0) + 1
        g["loops"] += loop
        g["costs"].append(cost)
        g["unpriced_llm_calls"] += r["unpriced"]
        g["events"] += run["events"]
        g["runs_with_policy_hit"] += bool(r["policy_hits"])
        for key, n in r["policy_hits"].items():
            g["policy_hits"][key] = g["policy_hits"].get(key, 0) + n
        for status, n in r["approvals"].items():
            g["approvals"][status] += n
        g["approval_waits_ms"] += r["waits"]
        g["feedback_scores"] += scores
    for g in groups.values():
        scores = g.pop("feedback_scores")
        g["feedback"] = len(scores)
        g["feedback_score"] = math.fsum(scores) / len(scores) if scores else None
        g["cost_usd"] = math.fsum(g.pop("costs"))
        # all runs' cost, failed ones too, over the runs that succeeded
        g["cost_per_success"] = g["cost_usd"] / g["successes"] if g["successes"] else None
        g["success_rate"] = g["successes"] / g["runs"]
    return {"groups": groups, "runs": runs}


def genai_prices_fn(model: str, provider: str, input_tokens: int, output_tokens: int,
                    cache_read_input_tokens: int) -> float | None:
    """A price_fn backed by the genai-prices package (optional); None when it or the model is unknown.

    input_tokens includes the cached ones, as genai-prices counts them.
    """
    try:
        from genai_prices import Usage, calc_price
        price = calc_price(Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                 cache_read_tokens=cache_read_input_tokens),
                           model_ref=model, provider_id=provider)
    except Exception:  # missing package, unknown model: the caller counts the call as unpriced
        return None
    return float(price.total_price)


def _dumps(ev: dict) -> bytes:
    return orjson.dumps(ev)


def write_jsonl(events: Iterable[dict], path: str) -> int:
    """Write one JSON object per line; returns the number written."""
    n = 0
    with open(path, "wb") as f:
        for ev in events:
            f.write(_dumps(ev) + b"\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default="-", help="JSON Lines file, or - for stdout")
    ap.add_argument("--hours", type=float, default=2.0, help="span of event time")
    ap.add_argument("--start-ms", type=int, default=DEFAULT_START_MS)
    ap.add_argument("--canary", action="store_true", help=f"add the default canary ({DEFAULT_CANARY.agent_id} "
                                                          f"{DEFAULT_CANARY.version})")
    ap.add_argument("--cost", action="store_true", help="report cost_usd on some llm_calls (needs genai-prices)")
    ap.add_argument("--cost-fraction", type=float, default=0.3)
    ap.add_argument("--no-governance", action="store_true", help="no approval, policy_hit or feedback events")
    args = ap.parse_args(argv)
    cfg = FleetConfig(seed=args.seed, runs=args.runs, start_ms=args.start_ms,
                      duration_ms=int(args.hours * HOUR_MS), canary=DEFAULT_CANARY if args.canary else None,
                      price_fn=genai_prices_fn if args.cost else None, cost_fraction=args.cost_fraction,
                      governance=not args.no_governance)
    began = time.perf_counter()
    if args.out == "-":
        n = 0
        out = sys.stdout.buffer
        for ev in simulate(cfg):
            out.write(_dumps(ev) + b"\n")
            n += 1
        out.flush()
    else:
        n = write_jsonl(simulate(cfg), args.out)
    print(f"{n} events, {args.runs} runs in {time.perf_counter() - began:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
