"""The README's pictures of the console, made from the demo: `trackside demo --serve` in a child
process, a live agent with runs still going, then the Fleet, Live runs, Run, Canary and Failure modes pages in
Debian's headless chromium (Selenium: the dev extra).

    python -m jobs.screenshots [--out streams/console/screenshots]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson

from streams.client import Trackside
from streams.ops.broker import free_port


def _get(url: str) -> list | dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return orjson.loads(response.read())


def _agents_at_work(bootstrap: str, stop: threading.Event) -> None:
    """Three runs of a slow agent that stay open while the pictures are taken."""
    agent = Trackside(bootstrap, "research-agent", "2.3.0")
    runs = [agent.start_run(task_id=f"question-{i}") for i in range(3)]
    step = 0
    while not stop.is_set():
        for i, run in enumerate(runs):
            run.llm_call(model="claude-sonnet-4-5", provider="anthropic", input_tokens=3000 + 400 * step,
                         output_tokens=120, latency_ms=1800)
            run.tool_call(("web_search", "fetch_page", "web_search")[(step + i) % 3], args={"q": f"q{i}-{step}"},
                          latency_ms=700)
        step += 1
        stop.wait(1.0)
    for run in runs:
        run.end("success")
    agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="streams/console/screenshots")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port, console_port, data = free_port(), free_port(), Path(".trackside/screenshots")
    env = {**os.environ, "TRACKSIDE_EMBEDDED_PORT": str(port), "TRACKSIDE_CONSOLE_PORT": str(console_port),
           "TRACKSIDE_DATA_DIR": str(data), "TRACKSIDE_METRICS_PORT": str(free_port())}
    demo = subprocess.Popen([str(Path(sys.executable).parent / "trackside"), "demo", "--serve", "600"], env=env,
                            stdout=subprocess.PIPE, text=True)
    stop = threading.Event()
    try:
        for line in demo.stdout:
            if line.startswith("console: "):
                break
        base = f"http://127.0.0.1:{console_port}"
        working = threading.Thread(target=_agents_at_work, args=(f"127.0.0.1:{port}", stop), daemon=True)
        working.start()
        while len(_get(f"{base}/api/v1/runs/live")) < 3:
            time.sleep(0.5)
        loop = next(a for a in _get(f"{base}/api/v1/alerts?kind=loop&limit=50") if a["status"] == "firing")
        canary = next(c for c in _get(f"{base}/api/v1/canaries") if c["verdict"] == "rollback")
        shots = {"fleet": "/?hours=6", "live": "/live", "run": f"/runs/{loop['run_id']}",
                 "canary": f"/canaries/{canary['agent_id']}/{canary['version']}",
                 "failure-modes": "/failure-modes?hours=6"}
        _shoot(base, shots, out)
        print(f"screenshots in {out}: {', '.join(f'{name}.png' for name in shots)}")
    finally:
        stop.set()
        demo.send_signal(signal.SIGINT)
        demo.wait(60)
    return 0


def chromium(width: int = 1400, height: int = 900, *, browser_log: bool = False):  # noqa: ANN201 (a WebDriver)
    """Debian's chromium, headless, through its chromedriver (Selenium: the dev extra); with
    `browser_log` its console messages can be read (`get_log("browser")`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    if browser_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def _shoot(base: str, shots: dict[str, str], out: Path) -> None:
    driver = chromium()
    try:
        for name, path in shots.items():
            driver.get(base + path)
            time.sleep(2.0)  # the live stream's first message, the chart's drawing
            driver.save_screenshot(str(out / f"{name}.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    sys.exit(main())
