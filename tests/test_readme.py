"""The README stays true: its commands name real files, CI runs its test command, every config field is documented."""
import os
import re

from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def flat_fields(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from flat_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_config_field_is_in_the_reference():
    reference = README[README.index("## Config reference"):]
    section, documented = "", set()
    for line in reference.splitlines():
        m = re.match(r"\*\*`config\.(\w+)`\*\*", line)
        if m:
            section = m.group(1) + "."
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            documented.add(section + m.group(1))
    missing = sorted(set(flat_fields(default.get_config())) - documented)
    assert not missing, f"README's config reference lacks {missing}"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"The test suite .*?```bash\n(.+?)\n```", README, re.S).group(1).strip()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert command in ci.splitlines(), (command, ci)


def test_readme_configs_exist():
    for path in set(re.findall(r"--config (configs/\w+\.py)", README)):
        assert os.path.exists(os.path.join(ROOT, path)), path
