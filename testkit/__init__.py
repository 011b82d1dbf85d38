"""Test support, outside the library users run: tiny SD 1.x- and SDXL-shaped models built from configs
with fixed seeds, random-weight ArcFace files in their real layout, and prepared folders written the
way `dataset_tools.prepare` writes them. The tests, the demo (`make demo`) and the benchmarks import it;
`library/` never does (tests/test_layout.py)."""
