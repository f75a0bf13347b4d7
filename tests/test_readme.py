"""The README's plugin example works as written."""

import re
from pathlib import Path

from benchmark.run import main
from models import MODELS

from .benchmark.conftest import store_runs, write_suite

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin_code() -> str:
    text = README.read_text()
    match = re.search(r"<!-- plugin-example -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "README lost its plugin example block"
    return match.group(1)


def test_readme_plugin_example_runs(tmp_path):
    plugin = tmp_path / "my_models.py"
    plugin.write_text(readme_plugin_code())
    suite = write_suite(tmp_path, models=("mmoe",), seeds=(0,), correlations=(0.5,))
    results = tmp_path / "results"

    code = main(["--suite", str(suite), "--results-dir", str(results), "--plugin", str(plugin),
                 "--models", "wide_towers,mmoe"])

    assert code == 0
    _, _, children = store_runs(results)
    finished = {c.data.tags["model"]: c for c in children if c.info.status == "FINISHED"}
    assert set(finished) == {"wide_towers", "mmoe"}
    assert abs(finished["wide_towers"].data.metrics["param_count"] - 3000) / 3000 <= 0.02
    assert "wide_towers" in MODELS.names()


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"## Run the tests\n\n```bash\n(.*?)\n```", text).group(1)
    assert test_command in ci
