"""The end-of-fit HTML report (callbacks/report.py, ``diagnosis.html``): well-formed, self-contained (every
image a PNG data URI, no script, no external asset), every string escaped, every finding and table on the
page; written by a fit with the three monitors and by a config's fit through the CLI; a failure to build it
is one warning; and one page opened in a real headless browser (Selenium + chromium)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning_convnets.callbacks import (
    ActivationVarianceMonitor,
    BatchNormDriftMonitor,
    Diagnosis,
    Finding,
    GradientShatteringMonitor,
    MonitorCallback,
)
from lightning_convnets.callbacks import report as rp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr", "area", "base", "embed", "track"}
NASTY = "<script>alert('x')</script> & \"quoted\" <b>bold</b>"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ checking a page
class _Checker(HTMLParser):
    """Balanced tags (void elements aside), the images' sources, the text, and anything that is not allowed
    in a self-contained, script-free page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for name, value in attrs.items():
            if name.startswith("on"):
                self.errors.append(f"event handler {name} on <{tag}>")
            if name in ("src", "href") and value and re.match(r"^(https?:)?//", value):
                self.errors.append(f"external {name} {value!r}")
        if tag in ("script", "iframe", "object", "embed", "link"):
            self.errors.append(f"<{tag}> in the page")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_page(page: str) -> _Checker:
    """Assert the page is valid and self-contained; returns what was read from it."""
    assert page.startswith("<!DOCTYPE html>")
    ET.fromstring(page.split("\n", 1)[1])  # well-formed XML as well (raises ParseError otherwise)
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors
    assert checker.stack == [], f"unclosed: {checker.stack}"
    assert checker.tags.count("html") == 1 and checker.tags.count("body") == 1
    assert "@import" not in page and "url(" not in page  # no asset pulled by the style sheet
    for img in checker.images:
        src = img.get("src") or ""
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
        assert img.get("alt")
    return checker


def _png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 7), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _findings() -> list[Finding]:
    return [
        Finding("activation_variance", "warning", ["net.layer2.0"], "variance grows 1.9x per block " + NASTY,
                "add BN " + NASTY, step=12, kind="variance_exponential"),
        Finding("batchnorm", "error", [], "first NaN <in> bn1", "lower the LR", step=3, kind="nonfinite"),
        Finding("shattering", "info", ["net"], "gradients are smooth: rho(1) = 0.93", kind="smooth_gradients"),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ the page alone
def test_page_is_valid_self_contained_escaped_and_shows_everything():
    report = Diagnosis()
    report.add(_findings())
    report.add_figure("activation_variance", "variance_vs_depth", _png())
    report.add_figure("batchnorm", "discrepancy <&>", _png("blue"))
    report.add_tables("batchnorm", {
        "BN drift per layer": [{"layer": "bn<1>", "z_shift": 0.25, "var_ratio": float("nan"), "channels": 4},
                               {"layer": "bn2", "z_shift": 1e-7, "extra": None, "ok": True}],
        "empty": [],
    })  # fmt: skip
    report.meta["log folder"] = "/tmp/run <1>"
    page = report.to_html()
    checker = check_page(page)
    text = " ".join(" ".join(checker.text).split())
    assert len(checker.images) == 2
    for f in report.findings:  # every finding, its suggestion and layers, as text (unescaped once)
        assert f.message in text and f.suggestion in text
        assert all(layer in text for layer in f.layers)
    assert "<script>alert" not in page and NASTY not in page  # escaped, never markup
    # severity order (error first) and colour classes
    assert text.index("first NaN") < text.index("variance grows") < text.index("gradients are smooth")
    assert all(f'class="finding {s}"' in page for s in ("error", "warning", "info"))
    assert "1 error" in text and "1 warning" in text and "1 info" in text
    # the table: header is the union of the rows' keys, numbers at 4 significant digits, NaN/None as "-"
    for cell in ("bn<1>", "z_shift", "var_ratio", "channels", "extra", "0.25", "1e-07", "yes", "(no rows)"):
        assert cell in text, cell
    assert "/tmp/run <1>" in text


def test_empty_report_and_long_tables_are_thinned():
    page = rp.render_html([], [], [("m", "long", [{"step": i} for i in range(1000)])], max_rows=50)
    checker = check_page(page)
    text = " ".join(checker.text)
    assert "No monitor reported anything" in text and "No monitor drew a figure" in text
    assert "0 errors" in text and "0 warnings" in text
    assert "50 of 1000 rows shown" in text
    assert page.count("<tr>") == 51 and ">0<" in page and ">999<" in page  # first and last kept
    with pytest.raises(ValueError, match="max_rows"):
        rp.render_html([], max_rows=1)


def test_bad_figures_and_tables_are_named():
    report = Diagnosis()
    with pytest.raises(ValueError, match="m/k is not a PNG"):
        report.add_figure("m", "k", b"GIF89a")
    with pytest.raises(TypeError, match="m: tables"):
        report.add_tables("m", [{"a": 1}])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="table 't' must be a list of dicts"):
        report.add_tables("m", {"t": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="expected PNG bytes"):
        rp.png_data_uri(b"not a png")


def test_history_tables_fallback_reads_the_latest_entry_per_layer():
    history = [
        {"step": 2.0, "av/a/var": 9.0},
        {"step": 4.0, "av/stem/var": 1.0, "av/stem/dead_fraction": 0.0, "av/l.0/var": 2.0,
         "av/l.0/branch_ratio": 0.5, "av/growth_per_block": 2.0, "other/x/var": 5.0},
    ]  # fmt: skip
    tables = rp.history_tables(history, "av")
    assert tables == {
        "per layer at step 4": [
            {"layer": "stem", "var": 1.0, "dead_fraction": 0.0},
            {"layer": "l.0", "var": 2.0, "branch_ratio": 0.5},
        ],
        "summary at step 4": [{"metric": "growth_per_block", "value": 2.0}],
    }
    assert rp.history_tables([], "av") == {}
    assert rp.layer_rows(history[1], "av", ["l.0", "missing"], keys=["var", "nope"]) == [
        {"layer": "l.0", "var": 2.0}
    ]


# ------------------------------------------------------------------------------------------ written by a fit
class SmallCNN(pl.LightningModule):
    """A plain module written the usual way: an nn.Sequential with BatchNorm, automatic optimization."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 2, (16,), generator=gen))
    return DataLoader(data, batch_size=4)


def _monitors(strict: bool | None = None) -> list[MonitorCallback]:
    return [
        ActivationVarianceMonitor(strict=strict),
        GradientShatteringMonitor(every_n_steps=3, num_points=16, strict=strict),
        BatchNormDriftMonitor(strict=strict),
    ]


def _fit(root: Path, callbacks: list[pl.Callback], steps: int = 6) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, log_every_n_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(SmallCNN(), _loader())
    return trainer


@pytest.fixture(scope="module")
def fitted_report(tmp_path_factory) -> Path:
    """The log folder of one fit with the three monitors (shared by the tests that read its page)."""
    root = tmp_path_factory.mktemp("fit")
    _fit(root, _monitors(strict=True))
    return root


def test_a_fit_writes_the_page_next_to_the_markdown(fitted_report):
    page = (fitted_report / "diagnosis.html").read_text(encoding="utf-8")
    checker = check_page(page)
    text = " ".join(" ".join(checker.text).split())
    findings = json.loads((fitted_report / "diagnosis.json").read_text())
    assert findings, "the fit found nothing to report"
    for f in findings:
        assert " ".join(f["message"].split()) in text
    # one image per figure the monitors drew (the PNG copies under figures/), the same bytes
    pngs = sorted((fitted_report / "figures").glob("monitors__*.png"))
    assert len(pngs) == len(checker.images) == 3
    embedded = {base64.b64decode(i["src"].split(",", 1)[1]) for i in checker.images}
    assert embedded == {p.read_bytes() for p in pngs}
    # tables of the three monitors: activation variance (the history fallback), BN drift, shattering probes
    for heading in ("activation_variance", "batchnorm", "shattering", "per layer at step 6",
                    "BN drift per layer at step 6", "probes (rho(1) over training)"):  # fmt: skip
        assert heading in text, heading
    for column in ("net.0", "net.1", "net.4", "var_ratio", "z_shift", "elements", "lag1", "verdict"):
        assert column in text, column
    assert "optimizer steps: 6" in text


def test_monitor_tables_directly():
    bn, shattering = BatchNormDriftMonitor(), GradientShatteringMonitor()
    assert bn.tables(None, None) == {} and shattering.tables(None, None) == {}
    assert MonitorCallback().tables(None, None) == {}
    shattering.append_history({"step": 3.0, "shattering/lag1": 0.9, "shattering/white_noise_band": 0.2})
    shattering.append_history({"step": 6.0, "shattering/lag1": 0.1, "shattering/white_noise_band": 0.2})
    shattering.append_history({"step": 9.0, "shattering/lag1": 0.3, "shattering/white_noise_band": 0.2})
    rows = shattering.tables(None, None)["probes (rho(1) over training)"]
    assert [(r["step"], r["verdict"]) for r in rows] == [(3, "smooth"), (6, "shattered"), (9, "partly shattered")]


def test_a_broken_page_is_one_warning_and_the_fit_goes_on(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rp, "render_html", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, _monitors(strict=False), steps=3)
    assert trainer.global_step == 3
    said = [str(w.message) for w in caught if "diagnosis.html" in str(w.message)]
    assert len(said) == 1 and "boom" in said[0]
    assert (tmp_path / "diagnosis.md").is_file() and (tmp_path / "diagnosis.json").is_file()
    assert not (tmp_path / "diagnosis.html").exists()
    # strict (this suite's default) re-raises instead
    with pytest.raises(RuntimeError, match="boom"):
        Diagnosis().write(tmp_path / "strict", strict=True)


class _BadTables(ActivationVarianceMonitor):
    monitor_name = "bad_tables"

    def tables(self, trainer, pl_module):
        raise KeyError("no such layer")


def test_a_monitor_whose_tables_raise_is_one_warning_and_the_page_has_the_rest(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, [_BadTables(strict=False), BatchNormDriftMonitor(strict=False)], steps=3)
    said = [str(w.message) for w in caught if "report tables" in str(w.message)]
    assert len(said) == 1 and "no such layer" in said[0]
    page = (tmp_path / "diagnosis.html").read_text()
    check_page(page)
    tables = page.split('<section id="tables">', 1)[1]
    assert "BN drift per layer" in tables and "bad_tables" not in tables
    with pytest.raises(KeyError, match="no such layer"):
        _fit(tmp_path / "strict", [_BadTables(strict=True)], steps=2)


# ------------------------------------------------------------------------------------------ the configs
def _standalone_configs() -> list[Path]:
    """Configs that define a whole run (a trainer and a model), not overlays."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if {"trainer", "model"} <= set(yaml.safe_load(p.read_text())))


# Configs whose fit has no monitor yet, so writes no report: this list only shrinks (a test fails once a
# listed config gains its monitors, so that it leaves the list).
WITHOUT_MONITORS: set[str] = set()  # every config lists the monitors: none may drop them


@pytest.mark.parametrize("config", _standalone_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_fit_lists_a_monitor(config):
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    paths = [c["class_path"] if isinstance(c, dict) else str(c) for c in callbacks]
    has = any(p.startswith("lightning_convnets.callbacks.") and p.endswith("Monitor") for p in paths)
    name = str(config.relative_to(CONFIGS))
    if name in WITHOUT_MONITORS:
        assert not has, f"{name} lists a monitor now: take it out of WITHOUT_MONITORS"
    else:
        assert has, f"{name}: its fit writes no diagnosis.html without a lightning_convnets.callbacks monitor"


def test_a_config_fit_through_the_cli_writes_the_page(tmp_path):
    from lightning_convnets.cli import ConvNetsCLI

    args = [
        "fit", "--config", str(CONFIGS / "classification" / "shapes.yaml"),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.precision=32", "--trainer.accelerator=cpu",
        "--trainer.devices=1", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--data.init_args.batch_size=4", f"--data.init_args.root={tmp_path / 'shapes'}",
        "--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.num_test=4",
        "--model.init_args.figure_every_n_epochs=0",
    ]  # fmt: skip
    cli = ConvNetsCLI(args=args)
    folder = Path(cli.trainer.logger.log_dir)
    assert (folder / "diagnosis.md").is_file()
    checker = check_page((folder / "diagnosis.html").read_text(encoding="utf-8"))
    text = " ".join(checker.text)
    for f in json.loads((folder / "diagnosis.json").read_text()):
        assert " ".join(f["message"].split()) in " ".join(text.split())
    assert "BN drift per layer" in text and checker.images


# ------------------------------------------------------------------------------------------ a real browser
def _browser() -> tuple[str, str] | None:
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.mark.skipif(_browser() is None, reason="needs chromium and chromedriver on PATH (Debian: apt-get install "
                    "chromium chromium-driver); CI installs them")  # fmt: skip
def test_the_page_in_a_headless_browser(fitted_report, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[dev])")
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager reach the network
    chromium, driver_path = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--blink-settings=scriptEnabled=false"):  # fmt: skip
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get((fitted_report / "diagnosis.html").as_uri())
        assert browser.title == "lightning-convnets diagnosis"
        body = browser.find_element(By.TAG_NAME, "body").text
        findings = json.loads((fitted_report / "diagnosis.json").read_text())
        for f in findings:  # rendered and visible, with its suggestion
            assert " ".join(f["message"].split()) in " ".join(body.split())
            if f["suggestion"]:
                assert " ".join(f["suggestion"].split()) in " ".join(body.split())
        shown = browser.find_elements(By.CSS_SELECTOR, "article.finding")
        assert len(shown) == len(findings) and all(a.is_displayed() for a in shown)
        widths = [int(img.get_property("naturalWidth")) for img in browser.find_elements(By.TAG_NAME, "img")]
        assert len(widths) == 3 and all(w > 0 for w in widths), widths
        assert browser.find_elements(By.CSS_SELECTOR, "table") and "BN drift per layer" in body
    finally:
        browser.quit()

