from dataclasses import fields
from pathlib import Path

from cgd import config
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
