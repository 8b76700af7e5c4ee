"""The shipped example datasets are exactly what data/examples/make_examples.py writes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_example_files_are_reproducible(tmp_path):
    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "data/examples/make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (ROOT / "data/examples").iterdir() if p.suffix in (".csv", ".jsonl"))
    for name in written:
        assert (tmp_path / name).read_text() == (ROOT / "data/examples" / name).read_text(), name
