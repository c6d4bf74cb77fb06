"""The sweep's last step with --serve: the fine-tuned model on Ray Serve, probed over HTTP
with real test images, what came back printed."""

from __future__ import annotations

from pathlib import Path

from cluster.runtime import cluster_cpus
from cluster.sweep_config import SweepConfig
from resnet_dist.checkpoint import FINETUNED_CHECKPOINT


def serve_and_probe(cfg: SweepConfig, console, probes: int = 8) -> str:
    """Deploy the fine-tuned model on Ray Serve, send `probes` real test images, print
    what came back; returns the app's URL."""
    import io

    import httpx
    import numpy as np
    from PIL import Image
    from rich.table import Table

    from cluster.serve import ServeConfig
    from cluster.serve_deploy import deploy
    from resnet_dist.data import read_split

    from resnet_dist import storage

    console.print(f"deploying {storage.join(cfg.sweep_target, FINETUNED_CHECKPOINT)} on Ray Serve, then {probes} test images...",
                  soft_wrap=True)
    # Two replicas' worth of CPU is not there on a small machine; a sweep's model is small.
    # From the storage itself (a URI too): a replica may start on any node.
    url = deploy(ServeConfig(checkpoint=cfg.sweep_target, num_cpus=min(1.0, max(0.5, cluster_cpus() - 1))))
    data_dir = cfg.sweep_dir / "finetune-data" if cfg.finetune.data else Path(cfg.data_dir)
    test = read_split(data_dir, "test")
    table = Table(title=f"Ray Serve at {url}: {probes} test images")
    for col in ("image", "true class", "predicted", "probability"):
        table.add_column(col)
    with httpx.Client(timeout=30) as client:
        # Spread over the split, which is stored class by class, so the probes show several classes.
        for i in np.linspace(0, len(test.labels) - 1, probes).astype(int).tolist():
            buf = io.BytesIO()
            Image.fromarray(test.images[i]).save(buf, format="PNG")
            r = client.post(f"{url}/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
            r.raise_for_status()
            top = r.json()["predictions"][0]
            table.add_row(str(i), test.classes[test.labels[i]], top["class"], f"{top['probability']:.2f}")
    console.print(table)
    console.print(f"try it: curl -s -X POST --data-binary @image.png -H 'content-type: image/png' {url}/v1/predict")
    return url
