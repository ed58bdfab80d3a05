"""The fast price path agrees with genai-prices' exact calculation, tiers included."""

import pytest
from genai_prices import Usage, calc_price

from streams.ingest.pricing import PriceTable, price_event


def exact(model, provider, input_tokens, output_tokens, cache_read):
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cache_read)
    return float(calc_price(usage, model_ref=model, provider_id=provider).total_price)


@pytest.mark.parametrize(("model", "provider"), [
    ("gpt-4o", "openai"), ("gpt-4o-mini", "openai"), ("claude-sonnet-4-5", "anthropic"),
    ("claude-haiku-4-5", "anthropic"), ("gemini-2.5-pro", "google"),
])
@pytest.mark.parametrize(("input_tokens", "output_tokens", "cache_read"), [
    (1, 1, 0), (12_345, 678, 2_000), (199_999, 4_000, 0), (250_000, 8_000, 100_000), (900_000, 1, 0),
])
def test_matches_exact_price(model, provider, input_tokens, output_tokens, cache_read):
    table = PriceTable()
    assert table.price(model, provider, input_tokens, output_tokens, cache_read) == pytest.approx(
        exact(model, provider, input_tokens, output_tokens, cache_read), rel=1e-9
    )


def test_unknown_model_has_no_price_and_unknown_provider_falls_back_to_the_model():
    table = PriceTable()
    assert table.price("no-such-model-xyz", "nobody", 1000, 10) is None
    assert table.price("gpt-4o", "my-gateway", 1000, 10) == pytest.approx(exact("gpt-4o", None, 1000, 10, 0))


def test_price_event_records_its_source():
    table = PriceTable()
    base = {"type": "llm_call", "model": "gpt-4o", "provider": "openai", "input_tokens": 100,
            "output_tokens": 10, "cache_read_input_tokens": 0}
    reported = {**base, "cost_usd": 0.5}
    priced = {**base, "cost_usd": None}
    unknown = {**base, "model": "mystery", "cost_usd": None}
    tool = {**base, "type": "tool_call", "cost_usd": None}
    for event in (reported, priced, unknown, tool):
        price_event(table, event)
    assert (reported["cost_source"], reported["cost_usd"]) == ("reported", 0.5)
    assert priced["cost_source"] == "price_table" and priced["cost_usd"] > 0
    assert (unknown["cost_source"], unknown["cost_usd"]) == ("unknown", None)
    assert tool["cost_source"] == ""
