"""The main job on the embedded default: make data if none is given, export a bundle, serve, show an answer."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from recsys_cli.stack import Stack


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def _sample_items(bundles: Path) -> list[tuple[str, str]]:
    """Three items that share a genre: a new user's first clicks, so the answer visibly follows them."""
    from recsys_common.bundle import open_bundle
    from recsys_common.catalog import Catalog

    catalog = Catalog.load(open_bundle(bundles))
    first_genre = next((g[0] for g in catalog.genres if g), None)
    picks = [i for i, g in enumerate(catalog.genres) if first_genre is None or first_genre in g][:3]
    return [(catalog.item_ids[i], catalog.titles[i]) for i in picks]


def run_demo(
    workdir: Path, data: Path | None, host: str, port: int, keep_serving: bool, config: Path | None = None
) -> int:
    workdir = workdir.resolve()
    bundles = workdir / "bundles"
    if data is None:
        data = workdir / "data"
        if not (data / "interactions.csv").exists():
            from exporter.synth import generate

            print(f"[1/4] making synthetic data in {data}", flush=True)
            generate(data)
    if (bundles / "CURRENT").exists():
        print(f"[2/4] using the bundle already published in {bundles} (delete it to rebuild)", flush=True)
    else:
        from exporter.config import ExportConfig
        from exporter.pipeline import run_export

        print(f"[2/4] exporting a bundle from {data} into {bundles}", flush=True)
        # The demo evaluates on `loo` only, to show a first answer sooner; `recsys export` runs both protocols.
        chosen = ExportConfig.from_json(config) if config else ExportConfig(eval_protocols=("loo",))
        run_export(chosen, data, bundles, progress=True)

    print("[3/4] starting retrieval, ranking and the gateway", flush=True)
    with Stack(bundles, workdir / "state", host=host, http_port=port, grpc_port=0) as stack:
        url = stack.http_url
        user = f"demo-user-{int(time.time())}"
        picks = _sample_items(bundles)
        now = int(time.time())
        events = [
            {"user_id": user, "item_id": item_id, "timestamp": now + n, "event_id": f"{user}-{n}"}
            for n, (item_id, _) in enumerate(picks)
        ]
        accepted = _post(f"{url}/v1/events", {"events": events})["accepted"]
        answer = _post(f"{url}/v1/recommendations", {"user_id": user, "k": 5, "debug": True})
        print(f"[4/4] a new user clicked: {', '.join(title for _, title in picks)} ({accepted} events stored)")
        print("their next recommendations:")
        print(json.dumps(answer, indent=2))
        print(
            f"\n{stack.banner()}\n\nTry it:\n"
            f"  curl -s {url}/v1/recommendations -H 'Content-Type: application/json' "
            f'-d \'{{"user_id": "{user}", "k": 10}}\'\n'
            f"  curl -s {url}/v1/events -H 'Content-Type: application/json' "
            f'-d \'{{"events": [{{"user_id": "{user}", "item_id": "{picks[-1][0]}", "timestamp": {now + 9}}}]}}\''
            f"\n\nOr open {url}/ in a browser: pick \"New user\" (or {user}), click items, watch the list change.",
            flush=True,
        )
        return stack.wait() if keep_serving else 0
