"""The one evaluation job runs end to end and holds its bars on a fixed seed."""

from jobs import evaluate


def test_evaluate_job_holds_the_bars_on_seed_1(capsys):
    assert evaluate.main(["--seeds", "1", "--runs", "600", "--fast-prices"]) == 0
    out = capsys.readouterr().out
    assert "adjusted Rand index" in out and "precision" in out and "missed" not in out
