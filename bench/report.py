"""Render bench/out/results*.json as the Markdown table used in bench/RESULTS.md.

Usage: python bench/report.py bench/out/results.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    rows = []
    for name in sys.argv[1:]:
        rows.extend(json.load(open(name))["rows"])
    peers = ["imageshare", "orthanc", "pynetdicom-floor"]
    print("| measurement | unit | ImageShare | Orthanc | pynetdicom floor | ImageShare vs Orthanc "
          "| ImageShare vs floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        values = row["values"]
        cells = [f"{values[p]:,.1f}" if p in values else "" for p in peers]
        ratios = []
        for peer in peers[1:]:
            if peer in values and values.get("imageshare"):
                mine, theirs = values["imageshare"], values[peer]
                ratio = mine / theirs if row["better"] == "higher" else theirs / mine
                ratios.append(f"{ratio:.2f}x")
            else:
                ratios.append("")
        print(f"| {row['metric']} | {row['unit']} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main()
