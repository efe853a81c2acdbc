"""Test and fixture helpers for naclip (tiny open_clip ViTs built from the golden-fixture manifest)."""

from naclip.testing.tiny import build_visual_from_manifest

__all__ = ["build_visual_from_manifest"]
