"""The README's MLflow screenshot, taken from a real workspace in a real headless browser.

It starts the light MLflow server the README gives (one worker, no job runner) on the
workspace's `mlflow.db`, opens the runs of one study in the "Model training" view, groups
them by the `level` tag, shows the `val_accuracy` charts, and saves a PNG. These are the
clicks the README describes, so the picture shows what a user will see.

Needs Chromium (`apt-get install chromium`) and Playwright (`pip install -e '.[bench]'`).

Run:   python bench/mlflow_screenshot.py --workspace DIR [--study padding] [--out PNG]
where DIR holds `mlflow.db` from `dvc repro` (e.g. the embedded data with
`sweep.n_trials` 6, which gives the padding study three seeds per level).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

OUT = Path(__file__).with_name("mlflow-runs.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workspace: Path, port: int) -> subprocess.Popen:
    """`mlflow server` as the README starts it for a laptop."""
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(mlflow), "server", "--backend-store-uri", "sqlite:///mlflow.db"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(
        command, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("mlflow server did not answer within 60 s")


def experiment_id(port: int, name: str) -> str:
    import json

    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["experiment"]["experiment_id"]


def screenshot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 800})
        page.goto(url)
        page.get_by_role("button", name="Group by").wait_for(timeout=60000)
        close = page.get_by_role("button", name="Close")  # the assistant panel, if shown
        if close.count():
            close.first.click()
        page.get_by_role("button", name="Group by").click()
        page.get_by_text("level", exact=True).first.click()
        page.keyboard.press("Escape")
        page.get_by_placeholder("Search metric charts").fill("val_accuracy")
        page.wait_for_timeout(4000)  # the charts draw after their data arrives
        page.screenshot(path=str(out))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="folder with mlflow.db")
    parser.add_argument("--study", default="padding")
    parser.add_argument("--experiment", default="conv-ablation", help="the MLflow experiment")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        sys.exit("no chromium on PATH: apt-get install chromium")
    port = free_port()
    server = start_server(args.workspace.resolve(), port)
    try:
        query = quote(f"tags.study = '{args.study}'")
        url = (
            f"http://127.0.0.1:{port}/#/experiments/{experiment_id(port, args.experiment)}/runs"
            f"?workflowType=machine_learning&compareRunsMode=CHART&searchFilter={query}"
        )
        screenshot(url, args.out)
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
