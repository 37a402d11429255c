"""The README's quick-start is a real file, and it runs."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_is_the_readme_example(capsys):
    source = (ROOT / "examples" / "quickstart.py").read_text()
    assert source in (ROOT / "README.md").read_text()
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("lora_B of ") and "v_proj" in out[0]
    assert [line.split()[:2] for line in out[1:]] == [
        ["0", "default"],
        ["0", "paper"],
        ["1", "default"],
        ["1", "paper"],
    ]
    for line in out[1:]:  # both keep the small source whole and give gsm/aqua their budgets
        assert "'gcd': {'in_batch': 2, 'kept': 2, 'selected': 2}" in line
        assert "'gsm': {'in_batch': 9, 'kept': 0, 'selected': 4}" in line
