"""Read our custom metrics from Triton's Prometheus endpoint."""

from __future__ import annotations

import re
import urllib.request

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """All labelled samples at ``url`` as ``(name, labels, value)``."""
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    samples = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            samples.append((match["name"], dict(_LABEL.findall(match["labels"])), float(match["value"])))
    return samples


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    return sum(v for n, sample_labels, v in scrape(url) if n == name and labels.items() <= sample_labels.items())


def exits_per_ramp(url: str, model: str) -> dict[int, int]:
    return {
        int(labels["exit"]): int(value)
        for name, labels, value in scrape(url)
        if name == "apparate_exits_total" and labels.get("model") == model
    }
