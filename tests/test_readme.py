"""README's promises: the drop-in example runs, and .ci/run runs README's test command."""

import re

import pytest

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = blocks[1].strip()
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


@pytest.mark.filterwarnings("ignore:adaptau. no fused backend")
def test_drop_in_example_runs(capsys):
    section = README.split("## Drop-in use", 1)[1]
    code = re.search(r"```python\n(.*?)\n```", section, flags=re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md:drop-in", "exec"), namespace)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all("w0" in line for line in out)
    assert namespace["loss"].isfinite()
