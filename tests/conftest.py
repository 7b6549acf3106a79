"""Shared test setup: CPU only, no network, quiet matplotlib."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm / smp must never reach the hub in tests
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
