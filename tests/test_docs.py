"""The docs match the code: every config key documented, every library room on the map."""

from __future__ import annotations

import re

from inprocess_grid import ROOT

from fedzo_flwr.config import RunConfig


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_readme_configuration_table_lists_every_run_config_key():
    readme = (ROOT / "README.md").read_text()
    table = _section(readme, "## Configuration", "## Layout")
    documented: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z0-9-]+)`", line.split("|")[1]))
    keys = set(RunConfig().to_run_config())
    assert keys - documented == set(), "undocumented run-config keys"
    assert documented - keys == set(), "README documents keys that do not exist"


def test_architecture_map_names_every_room_of_the_library():
    text = (ROOT / "docs" / "architecture.md").read_text()
    rooms = sorted(
        f"{p.name}/" if p.is_dir() else p.name
        for p in (ROOT / "fedzo_flwr").iterdir()
        if (p.is_dir() and (p / "__init__.py").is_file())
        or (p.suffix == ".py" and p.name != "__init__.py")
    )
    missing = [room for room in rooms if f"  {room}" not in text]
    assert missing == [], f"the room list of docs/architecture.md lacks {missing}"
