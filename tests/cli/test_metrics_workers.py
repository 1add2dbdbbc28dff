"""Metrics of ``server run --workers 2``: whichever worker answers a scrape, it reports the
traffic of both, and a restart starts the counts afresh."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..server.processes import clean_env, init_data_dir, running_server, tessera


def _health_answers(url: str, token: str, ca: str) -> float:
    scraped = httpx.get(
        f"{url}/metrics",
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=ca),
    )
    assert scraped.status_code == 200, scraped.text
    total = 0.0
    for family in text_string_to_metric_families(scraped.text):
        for sample in family.samples:
            if sample.name == "tessera_http_requests_total" and sample.labels == {
                "interface": "health",
                "status": "200",
            }:
                total += sample.value
    return total


def test_a_scrape_adds_up_every_workers_counts(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    info = init_data_dir(data_dir)
    config = data_dir / "tessera.toml"
    config.write_text(config.read_text().replace("metrics = false", "metrics = true"))
    ca = info["ca"]
    for run in range(2):
        with running_server(data_dir, tls=True, ca=ca, extra=["--workers", "2"]) as url:
            env = clean_env(TESSERA_URL=url, TESSERA_TOKEN=info["admin_token"], TESSERA_CA=ca)
            made = tessera("token", "create", "--role", "readonly", "--name", "prometheus", "--json", env=env)
            assert made.returncode == 0, made.stderr
            scraper = json.loads(made.stdout)["token"]
            baseline = _health_answers(url, scraper, ca)  # running_server's own start-up polls
            pinned = ssl.create_default_context(cafile=ca)
            for _ in range(40):  # a new connection each: the kernel spreads them over both workers
                assert httpx.get(f"{url}/api/v1/health", verify=pinned).status_code == 200
            workers = {p.name.split("_")[-1] for p in (data_dir / "run" / "metrics").glob("counter_*.db")}
            assert len(workers) == 2, workers  # both workers counted something
            for _ in range(4):  # whichever worker answers the scrape
                assert _health_answers(url, scraper, ca) == baseline + 40
            if run == 1:
                assert baseline < 40  # the first run's counts did not come back
