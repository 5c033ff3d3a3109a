"""The PS3.6 data dictionary without importing pydicom: pydicom's own table, loaded on its own.

``import pydicom`` costs 0.2-0.4 s (its package imports the pixel handlers and their libraries); a
header edit of a few hundred files takes about as long as that in all.  The table is the same file
pydicom's ``datadict`` uses (``pydicom/_dicom_dict.py``, one dict literal, its cached bytecode loaded
in ~10 ms), so every answer here is pydicom's answer.  Only the main dictionary is here: repeating
groups (60xx overlays, 50xx curves) and private dictionaries are pydicom's, and a miss here
(``None``) sends the caller to pydicom's ``datadict``.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

Entry = tuple[str, str, str, str, str]  # VR, VM, name, "Retired" or "", keyword


@cache
def table() -> dict[int, Entry]:
    """pydicom's ``DicomDictionary`` (tag -> entry), read from its file without running pydicom's package."""
    spec = importlib.util.find_spec("pydicom")  # a top-level spec: the package itself is not imported
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "_dicom_dict.py"
        module_spec = importlib.util.spec_from_file_location("kaapcli._pydicom_dict", path)
        if module_spec is not None and module_spec.loader is not None:
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
                return dict(module.DicomDictionary)
            except (OSError, SyntaxError, AttributeError):
                pass
    from pydicom.datadict import DicomDictionary  # another layout of pydicom: the same table, the slow way

    return dict(DicomDictionary)


@cache
def _keywords() -> dict[str, int]:
    return {entry[4]: tag for tag, entry in table().items()}  # as pydicom's keyword_dict: the last one wins


def entry(tag: int) -> Entry | None:
    """The main dictionary's entry of ``tag`` (None: a private, repeating-group or unknown tag)."""
    return table().get(tag)


def tag_for_keyword(keyword: str) -> int | None:
    """pydicom's ``tag_for_keyword``, which also looks in the main dictionary only."""
    return _keywords().get(keyword)


def is_private_creator(tag: int) -> bool:
    """(gggg,0010-00FF) of an odd group: it reserves a block of private elements (PS3.5 7.8.1)."""
    return bool(tag >> 16 & 1) and 0x0010 <= tag & 0xFFFF < 0x0100
