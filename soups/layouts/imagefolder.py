"""`<root>/<class>/<image>`, or `<root>/train/<class>/...` with optional `val/` and `test/` beside
it (given splits are used as they are; missing ones are cut from train)."""

from __future__ import annotations

from pathlib import Path

from soups.layouts.files import class_folders
from soups.layouts.registry import Layout, register
from soups.samples import Samples


def read(root: Path) -> dict[str, Samples | None]:
    if not (root / "train").is_dir():
        return {"pool": class_folders(root, root), "val": None, "test": None}
    pool = class_folders(root / "train", root)
    given = {
        p: class_folders(root / p, root, pool.classes) if (root / p).is_dir() else None
        for p in ("val", "test")
    }
    return {"pool": pool, **given}


register(Layout("imagefolder", "<root>/<class>/<image>, or <root>/{train,val,test}/<class>/<image>", read))
