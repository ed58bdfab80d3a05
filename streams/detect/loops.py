"""Loop detection inside one run, while it is still going.
The rules (repeat, cycle, step budget): streams/detect/README.md, "Loops"."""

from __future__ import annotations

from dataclasses import dataclass, field

# (tool, args_hash, decision): args_hash is "" when the call's arguments are unknown, and then
# decision is (ts, input tokens, output tokens) of the model call that preceded it, if any.
ToolCall = tuple[str, str, "tuple[int, int, int] | None"]

# What a finding rests on: the calls' arguments; with arguments unknown, the tokens of the model
# calls around them (the same output each time, the conversation growing by the same result);
# the count of calls of one tool alone (weak: pagination looks the same); the run's steps.
ARGUMENTS, TOKENS, COUNT, STEPS = "arguments", "tokens", "count", "steps"
# Tokens by which two growths of the conversation by the same content may differ. A provider
# counts the same content alike (0 would do); the simulator scales counts and rounds (1).
TOKEN_SLACK = 1


@dataclass(frozen=True)
class LoopFinding:
    rule: str  # "repeat" | "cycle" | "tool_count" | "step_budget"
    calls: tuple[ToolCall, ...]  # the calls that make the loop, oldest first
    repeats: int
    summary: str
    basis: str = ARGUMENTS  # ARGUMENTS | TOKENS | COUNT | STEPS
    tokens: dict | None = None  # for TOKENS: the model's output tokens and the conversation's growth

    def evidence(self) -> dict:
        evidence = {
            "rule": self.rule,
            "basis": self.basis,
            "repeats": self.repeats,
            "calls": [{"tool": tool, "args_hash": args} for tool, args, _ in self.calls],
        }
        if self.tokens is not None:
            evidence["tokens"] = self.tokens
        return evidence


@dataclass(frozen=True)
class LoopPolicy:
    repeats: int = 3  # identical calls (or cycle turns) in a row that make a loop
    max_period: int = 3  # longest cycle looked for (A,B,C,A,B,C,...)
    max_steps: int = 200  # llm + tool calls a run may take
    step_budgets: dict[str, int] = field(default_factory=dict)  # per agent_id, overrides max_steps
    count_repeats: int = 5  # calls of one tool in a row, arguments unknown, that make a suspected loop
    stop_on_count: bool = False  # whether a suspected loop (count alone) asks to stop the run

    def budget(self, agent_id: str) -> int:
        return self.step_budgets.get(agent_id, self.max_steps)


def find_loop(calls: list[ToolCall], steps: int, budget: int, policy: LoopPolicy) -> LoopFinding | None:
    """The loop the newest tool call completes, if any; `calls` are the run's tool calls in order.

    Only the tail is examined: called after each new call, it finds a loop the moment the
    call that completes it arrives, in time independent of the run's length.
    """
    n = policy.repeats
    tail = calls[-n:]
    if len(tail) == n and tail[0][1] and all(call[:2] == tail[0][:2] for call in tail):
        tool = tail[0][0]
        return LoopFinding("repeat", tuple(tail), n, f"{tool} called {n} times in a row with the same arguments")
    for period in range(2, policy.max_period + 1):
        window = calls[-period * n:]
        if len(window) < period * n:
            break
        pattern = [call[:2] for call in window[:period]]
        if len(set(pattern)) < 2 or not all(args for _, args in pattern):
            continue  # a constant run of calls is a repeat; unknown arguments are no evidence of a cycle
        if all(window[i][:2] == pattern[i % period] for i in range(len(window))):
            tools = ",".join(tool for tool, _ in pattern)
            return LoopFinding("cycle", tuple(window), n, f"cycle {tools} repeated {n} times with the same arguments")
    if len(tail) == n and all(call[0] == tail[0][0] and not call[1] for call in tail):
        tokens = _same_decisions([call[2] for call in tail])
        if tokens is not None:
            return LoopFinding("repeat", tuple(tail), n, f"{tail[0][0]} called {n} times in a row; its arguments are "
                               f"unknown, but the model wrote the same {tokens['output_tokens']} tokens before each "
                               "call and each result grew the conversation alike", TOKENS, tokens)
    # the count alone, when the tokens cannot tell (no model call before some of the calls):
    # where they can, different tokens are evidence of progress
    m = policy.count_repeats
    tail = calls[-m:]
    if (len(tail) == m and all(call[0] == tail[0][0] and not call[1] for call in tail)
            and any(call[2] is None for call in tail)):
        return LoopFinding("tool_count", tuple(tail), m, f"{tail[0][0]} called {m} times in a row; its arguments "
                           "are unknown, so this rests on the count of calls alone", COUNT)
    if steps > budget:
        return LoopFinding("step_budget", tuple(calls[-policy.repeats:]), steps,
                           f"{steps} steps, over the budget of {budget}", STEPS)
    return None


def _same_decisions(decisions: list) -> dict | None:
    """The token evidence that calls whose arguments are unknown were one call made again: each
    decided by a model call of its own that wrote the same number of tokens, the conversation
    growing by the same number between them (the same call and the same result each turn);
    None when the tokens do not say so."""
    if any(decision is None for decision in decisions) or len({d[0] for d in decisions}) < len(decisions):
        return None
    if len({output for _, _, output in decisions}) > 1:
        return None
    growth = [later[1] - earlier[1] for earlier, later in zip(decisions, decisions[1:])]
    if min(growth) < 0 or max(growth) - min(growth) > TOKEN_SLACK:
        return None
    return {"output_tokens": decisions[0][2], "input_growth": growth}
