"""Regenerate the README's monitor plots from a quickstart fit.

Runs ``fit`` with ``configs/quickstart.yaml`` (all three monitors on) into a temporary log dir, then
copies the last plot of each monitor, downscaled, to ``docs/figures/``.

    python docs/make_figures.py
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
PLOTS = {
    "activation_variance": "monitors__activation_variance__variance_vs_depth",
    "shattering": "monitors__shattering__profile",
    "batchnorm": "monitors__batchnorm__discrepancy",
}


def main(width: int = 720) -> list[Path]:
    from lightning_convnets.cli import ConvNetsCLI

    with tempfile.TemporaryDirectory() as tmp:
        ConvNetsCLI(
            args=[
                "fit",
                "--config",
                str(ROOT / "configs" / "quickstart.yaml"),
                f"--trainer.logger.init_args.save_dir={tmp}",
                f"--trainer.default_root_dir={tmp}",
            ]
        )
        written = []
        OUT.mkdir(parents=True, exist_ok=True)
        for short, prefix in PLOTS.items():
            candidates = sorted(Path(tmp).rglob(f"{prefix}_step*.png"))
            if not candidates:
                raise FileNotFoundError(f"the quickstart fit wrote no {prefix}_step*.png under {tmp}")
            last = max(candidates, key=lambda p: int(re.search(r"step(\d+)", p.name).group(1)))
            image = Image.open(last).convert("RGB")
            image.thumbnail((width, width))
            target = OUT / f"{short}.png"
            image.save(target, optimize=True)
            written.append(target)
    for path in written:
        print(f"wrote {path.relative_to(ROOT)}")
    return written


if __name__ == "__main__":
    main()
