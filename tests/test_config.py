import json
import re
import tomllib
from dataclasses import asdict, fields
from pathlib import Path

from cgd import config
from cgd.split import WINDOW_RULES
from cgd.unlearn import UnlearnConfig


def test_docs_config_md_names_every_setting():
    """docs/config.md (what `--config` points users to) lists every default key and every unlearning field."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    cfg = config.defaults()
    keys = [k for k in cfg if not isinstance(cfg[k], dict)]
    keys += [f"[{s}]" for s in cfg if isinstance(cfg[s], dict)]
    keys += [f"\n{k} = " for s in cfg.values() if isinstance(s, dict) for k in s]
    keys += [f"`{f.name}`" for f in fields(UnlearnConfig)]
    missing = [k.strip() for k in keys if k not in doc]
    assert not missing, f"docs/config.md lacks {missing}"
    block = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)  # the page's defaults are the real ones
    assert tomllib.loads(block) == config.defaults()
    table = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", doc, re.M))  # the paper recipe's unlearning values
    paper = asdict(UnlearnConfig())
    for name, shown in table.items():
        want = paper[name]
        assert shown.strip() == ("(none)" if want is None else json.dumps(want)), name
    for rule in WINDOW_RULES:
        assert f'"{rule}"' in doc
