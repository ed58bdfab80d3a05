"""The price of an LLM call from the `genai-prices` table, fast enough for the ingest hot path.
How (linear unit prices checked against the exact calculation): streams/ingest/README.md, "Pricing"."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from operator import itemgetter

from genai_prices import Usage, calc_price

from streams.contracts.tables import EVENTS

REPORTED = "reported"
PRICE_TABLE = "price_table"
UNKNOWN = "unknown"

# (input, output, cache read) tokens, by growing input: tiers start at 128k or 200k input tokens.
_PROBES = (
    (1_000, 1_000, 0), (60_000, 8_000, 20_000), (128_000, 16_000, 64_000),
    (200_000, 32_000, 0), (1_000_000, 64_000, 500_000), (10_000_000, 64_000, 0),
)


_COST_USD, _COST_SOURCE = EVENTS.names.index("cost_usd"), EVENTS.names.index("cost_source")
_PRICE_INPUTS = itemgetter(*(EVENTS.names.index(name) for name in (
    "cost_usd", "type", "model", "provider", "input_tokens", "output_tokens", "cache_read_input_tokens")))


@dataclass(frozen=True)
class _Price:
    model: str
    provider: str | None
    # Calls with at most this many input tokens are priced by the linear formula.
    linear_max_input: int
    per_input: float = 0.0
    per_cache_read: float = 0.0
    per_output: float = 0.0


def _exact(model: str, provider: str | None, input_tokens: int, output_tokens: int, cache_read: int) -> float:
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(calc_price(usage, model_ref=model, provider_id=provider or None).total_price)


class PriceTable:
    """Prices LLM calls by model and provider; `price` returns None for an unknown model."""

    def __init__(self) -> None:
        self._prices: dict[tuple[str, str], _Price | None] = {}

    def _lookup(self, model: str, provider: str) -> _Price | None:
        key = (model, provider)
        if key not in self._prices:
            self._prices[key] = self._learn(model, provider or None)
        return self._prices[key]

    @staticmethod
    def _learn(model: str, provider: str | None) -> _Price | None:
        try:
            _exact(model, provider, 1, 0, 0)
        except LookupError:
            if provider is None:
                return None
            # An unknown provider name (a gateway, a self-hosted proxy) may still serve a known model.
            return PriceTable._learn(model, None)
        # Unit prices from small calls, below any tier.
        per_input = _exact(model, provider, 1_000, 0, 0) / 1_000
        per_output = _exact(model, provider, 0, 1_000, 0) / 1_000
        per_cache = _exact(model, provider, 1_000, 0, 1_000) / 1_000
        price = _Price(model, provider, 0, per_input, per_cache, per_output)
        held = 0
        for probe in _PROBES:
            exact = _exact(model, provider, *probe)
            if abs(_linear(price, *probe) - exact) > 1e-9 * max(1.0, exact):
                break
            held = probe[0]
        return _Price(model, provider, held, per_input, per_cache, per_output)

    def price(self, model: str, provider: str, input_tokens: int, output_tokens: int, cache_read: int = 0) -> float | None:
        """USD for one call, or None when the model is not in the table."""
        if not model:
            return None
        known = self._lookup(model, provider)
        if known is None:
            return None
        cache_read = min(cache_read, input_tokens)
        if input_tokens <= known.linear_max_input:
            return _linear(known, input_tokens, output_tokens, cache_read)
        return _exact(model, known.provider, input_tokens, output_tokens, cache_read)


def _linear(price: _Price, input_tokens: int, output_tokens: int, cache_read: int) -> float:
    # genai-prices counts cache reads inside input_tokens, as OpenTelemetry does.
    return (
        (input_tokens - cache_read) * price.per_input
        + cache_read * price.per_cache_read
        + output_tokens * price.per_output
    )


def price_event(table: PriceTable, event: dict) -> None:
    """Set `cost_usd` and `cost_source` of a normalised event in place."""
    event["cost_usd"], event["cost_source"] = _priced(
        table, event["cost_usd"], event["type"], event["model"], event["provider"], event["input_tokens"],
        event["output_tokens"], event["cache_read_input_tokens"])


def price_rows(table: PriceTable, rows: list[list]) -> None:
    """Set `cost_usd` and `cost_source` of `events` rows (streams.ingest.decode) in place."""
    for row in rows:
        row[_COST_USD], row[_COST_SOURCE] = _priced(table, *_PRICE_INPUTS(row))


def _priced(table: PriceTable, cost: float | None, kind: str, model: str, provider: str, input_tokens: int,
            output_tokens: int, cache_read: int) -> tuple[float | None, str]:
    if cost is not None:
        return cost, REPORTED
    if kind == "llm_call":
        cost = table.price(model, provider, input_tokens, output_tokens, cache_read)
        return cost, UNKNOWN if cost is None else PRICE_TABLE
    return None, ""
