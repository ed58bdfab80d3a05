"""How far each faust stage is behind what was handed to it, measured by the store sink, which sees both;
and the embedded broker's memory. How and when it alerts: streams/ops/README.md, "The pipeline watch"."""

from __future__ import annotations

from collections import deque

from streams.contracts.alerts import FIRING, cleared, fingerprint, make_alert

STAGES = ("assemble_runs", "compute_metrics")


class PipelineWatch:
    """Per stage and input partition: the timestamps handed over and not yet processed."""

    def __init__(self, bound_s: float) -> None:
        self.bound_ms = int(bound_s * 1000)
        self._pending: dict[tuple[str, int], deque[int]] = {}
        self._processed: dict[str, int] = dict.fromkeys(STAGES, 0)  # newest input ts processed, any partition
        self._firing: dict[str, dict] = {}

    def handed(self, stage: str, partition: int, ts_ms: int) -> None:
        """A message with Kafka timestamp `ts_ms` went to `stage`'s input partition."""
        pending = self._pending.setdefault((stage, partition), deque())
        if not pending or ts_ms >= pending[-1]:
            pending.append(ts_ms)

    def processed(self, stage: str, partition: int, ts_ms: int) -> None:
        """`stage` reported it has handled its input partition's messages up to `ts_ms`."""
        pending = self._pending.get((stage, partition))
        while pending and pending[0] <= ts_ms:
            pending.popleft()
        self._processed[stage] = max(self._processed[stage], ts_ms)

    def lag_ms(self, stage: str, now_ms: int) -> int:
        """Age of the oldest message handed to the stage and not processed; 0 when caught up."""
        oldest = [pending[0] for (name, _), pending in self._pending.items() if name == stage and pending]
        return max(0, now_ms - min(oldest)) if oldest else 0

    def last_message_age_ms(self, stage: str, now_ms: int) -> int | None:
        """Age of the newest input message the stage has processed; None before the first."""
        newest = self._processed[stage]
        return max(0, now_ms - newest) if newest else None

    def check(self, now_ms: int) -> list[dict]:
        """The `pipeline` alerts that start or end now."""
        alerts = []
        for stage in STAGES:
            lag = self.lag_ms(stage, now_ms)
            firing = self._firing.get(stage)
            if firing is None and lag > self.bound_ms:
                self._firing[stage] = firing = make_alert(
                    kind="pipeline", severity="critical", status=FIRING, fingerprint=fingerprint("pipeline", stage),
                    ts=now_ms, agent_id="",
                    summary=f"stage {stage} is {lag / 1000:.0f} s behind (bound {self.bound_ms / 1000:.0f} s): "
                            "messages handed to it are not processed",
                    evidence={"stage": stage, "lag_seconds": lag / 1000, "bound_seconds": self.bound_ms / 1000,
                              "last_processed_ts": self._processed[stage] or None},
                    episode=str(now_ms))
                alerts.append(firing)
            elif firing is not None and lag <= self.bound_ms:
                alerts.append(cleared(firing, now_ms))
                del self._firing[stage]
        return alerts

    def check_broker(self, resident_bytes: int, bound_bytes: int, now_ms: int) -> list[dict]:
        """The `pipeline` alert about the embedded broker's memory that starts or ends now: it
        keeps every message in memory (no retention), and past this bound the recycles (see
        Stack.recycle_broker) are not keeping it down."""
        firing = self._firing.get("broker")
        if firing is None and bound_bytes and resident_bytes > bound_bytes:
            self._firing["broker"] = firing = make_alert(
                kind="pipeline", severity="warning", status=FIRING, fingerprint=fingerprint("pipeline", "broker-memory"),
                ts=now_ms, agent_id="",
                summary=f"the embedded broker holds {resident_bytes / 1e6:,.0f} MB (bound {bound_bytes / 1e6:,.0f} MB): "
                        "it keeps every message in memory, and its recycles are not keeping it down "
                        "(TRACKSIDE_BROKER_MEMORY_BYTES)",
                evidence={"resident_bytes": resident_bytes, "bound_bytes": bound_bytes},
                episode=str(now_ms))
            return [firing]
        if firing is not None and resident_bytes <= bound_bytes:
            del self._firing["broker"]
            return [cleared(firing, now_ms)]
        return []
