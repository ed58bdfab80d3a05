"""Loop detection inside one run, while it is still going.
The rules (repeat, cycle, step budget): streams/detect/README.md, "Loops"."""

from __future__ import annotations

from dataclasses import dataclass, field

ToolCall = tuple[str, str]  # (tool, args_hash)


@dataclass(frozen=True)
class LoopFinding:
    rule: str  # "repeat" | "cycle" | "step_budget"
    calls: tuple[ToolCall, ...]  # the calls that make the loop, oldest first
    repeats: int
    summary: str

    def evidence(self) -> dict:
        return {
            "rule": self.rule,
            "repeats": self.repeats,
            "calls": [{"tool": tool, "args_hash": args} for tool, args in self.calls],
        }


@dataclass(frozen=True)
class LoopPolicy:
    repeats: int = 3  # identical calls (or cycle turns) in a row that make a loop
    max_period: int = 3  # longest cycle looked for (A,B,C,A,B,C,...)
    max_steps: int = 200  # llm + tool calls a run may take
    step_budgets: dict[str, int] = field(default_factory=dict)  # per agent_id, overrides max_steps

    def budget(self, agent_id: str) -> int:
        return self.step_budgets.get(agent_id, self.max_steps)


def find_loop(calls: list[ToolCall], steps: int, budget: int, policy: LoopPolicy) -> LoopFinding | None:
    """The loop the newest tool call completes, if any; `calls` are the run's tool calls in order.

    Only the tail is examined: called after each new call, it finds a loop the moment the
    call that completes it arrives, in time independent of the run's length.
    """
    n = policy.repeats
    tail = calls[-n:]
    if len(tail) == n and all(call == tail[0] for call in tail):
        tool = tail[0][0]
        return LoopFinding("repeat", tuple(tail), n, f"{tool} called {n} times in a row with the same arguments")
    for period in range(2, policy.max_period + 1):
        window = calls[-period * n:]
        if len(window) < period * n:
            break
        pattern = window[:period]
        if len(set(pattern)) < 2:
            continue  # a constant run of calls is a repeat, found above
        if all(window[i] == pattern[i % period] for i in range(len(window))):
            tools = ",".join(tool for tool, _ in pattern)
            return LoopFinding("cycle", tuple(window), n, f"cycle {tools} repeated {n} times with the same arguments")
    if steps > budget:
        return LoopFinding("step_budget", tuple(calls[-policy.repeats:]), steps, f"{steps} steps, over the budget of {budget}")
    return None
