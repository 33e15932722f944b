"""Reading a dataset's JSON file with errors that name it."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_json(path: str | os.PathLike, what: str = "") -> object:
    """The parsed content of the JSON file at `path`.

    Raises:
      FileNotFoundError naming the path (and `what` it should be);
      ValueError naming the path when it is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" + (f" ({what})" if what else ""))
    with path.open(encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
