"""kohya's folder convention: a source (kohya's `train_data_dir`) whose subfolders are named
`<repeats>_<name>` take their repeats from the name, and `<repeats>_<instance> <class>` names the DreamBooth
instance token(s) and class word.

As in kohya's sd-scripts (library/config_util.py, `generate_dreambooth_subsets_config_by_subdirs`): the name is
split at its first underscore, the part before must read as an integer (Python's `int`, as kohya's) of at
least 1, and the rest is kohya's "class tokens" (`10_sks dog` -> 10 repeats, `sks dog`; `5_my_char` -> 5,
`my_char`; `3` -> 3, no tokens). kohya reads only the images directly inside such a folder (a non-recursive
glob) and skips other folders with a warning; here those files are rows too (`outside_layout`), see
`placement`. When an image has no caption file, kohya captions it with the class tokens (DreamBoothDataset);
`caption_from_folder` does the same.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.core.errors import DataError
from shared.images import IMAGE_EXTENSIONS
from stages.ingest.config import MAX_REPEATS

#: "auto" takes a source for kohya's layout only if no folder asks for more repeats than this, so folders
#: named after a year or a date (`2023_summer`) are not read as 2023 repeats
AUTO_MAX_REPEATS = 1000


@dataclass(frozen=True)
class Subset:
    """One `<repeats>_<name>` folder."""
    folder: str         # the folder's name, e.g. "10_sks dog"
    repeats: int
    tokens: str         # kohya's class tokens: the name after the first underscore, e.g. "sks dog"

    @property
    def instance_prompt(self) -> str | None:
        """The DreamBooth instance prompt: the tokens when they hold an identifier before the class word
        (`sks dog`); None for a class-only name (`dog`, as kohya's regularization folders are named)."""
        words = self.tokens.split()
        return " ".join(words) if len(words) >= 2 else None

    @property
    def class_prompt(self) -> str | None:
        """The class word: the last word of the tokens (`sks dog` -> `dog`); None when there are no tokens."""
        words = self.tokens.split()
        return words[-1] if words else None

    def fields(self) -> tuple[tuple[str, object], ...]:
        """What an item of this folder records besides its repeats (for the DreamBooth work)."""
        return (("subset", self.folder), ("instance_prompt", self.instance_prompt),
                ("class_prompt", self.class_prompt))


def parse_folder_name(name: str) -> Subset | None:
    """The subset a folder name declares, or None when the part before the first underscore is no integer.
    The repeats are not range-checked here (see `folder_problem`)."""
    head, _, tokens = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return Subset(name, repeats, tokens)


def folder_problem(name: str) -> str | None:
    """Why a top-level folder is not a kohya subset (None: it is one)."""
    subset = parse_folder_name(name)
    if subset is None:
        return f"folder {name!r} is not named <repeats>_<name> (kohya skips it)"
    if subset.repeats < 1:
        return f"folder {name!r} asks for {subset.repeats} repeats (kohya skips it)"
    if subset.repeats > MAX_REPEATS:
        return f"folder {name!r} asks for {subset.repeats} repeats, more than {MAX_REPEATS}"
    return None


def check_repeats(root: Path, skip: frozenset[Path] = frozenset()) -> None:
    """A DataError naming the first subfolder of `root` (a source read with kohya's layout) whose name asks for
    more than MAX_REPEATS repeats: refused before anything is read, rather than its images being dropped."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return  # the walk reports an unreadable source
    for entry in entries:
        subset = parse_folder_name(entry.name)
        if subset is not None and subset.repeats > MAX_REPEATS and _is_dir(entry) \
                and Path(entry.path) not in skip:
            raise DataError(f"{entry.path}: a kohya folder asking for {subset.repeats} repeats, more than "
                            f"{MAX_REPEATS}; rename it (e.g. {MAX_REPEATS}_{subset.tokens or 'name'}), or read "
                            f"the source with layout = \"plain\"")


def placement(folder_rel: str) -> Subset | str:
    """The subset that the images directly in `folder_rel` (relative to the source root) belong to, or why
    they are outside the layout: directly in the source folder, in a folder not named `<repeats>_<name>`, or
    in a folder below a subset's (kohya reads a subset's folder only, not the folders inside it)."""
    if folder_rel == "":
        return "directly in the source folder; the kohya layout reads <repeats>_<name> subfolders"
    top, *deeper = folder_rel.split(os.sep)
    problem = folder_problem(top)
    if problem:
        return problem
    if deeper:
        return f"in a folder inside {top!r}; kohya reads only the images directly in a <repeats>_<name> folder"
    return parse_folder_name(top)  # type: ignore[return-value]


def looks_like_kohya(root: Path, skip: frozenset[Path] = frozenset()) -> tuple[bool, str]:
    """Whether `root` is laid out as kohya's `train_data_dir`, and why (or why not): at least one subfolder,
    every subfolder named `<repeats>_<name>` with 1..AUTO_MAX_REPEATS repeats, and no image directly in it.
    The pipeline's own folders (`skip`) do not count. An unreadable folder is not kohya's."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        return False, f"cannot list it: {e.strerror or e}"
    folders = []
    for entry in entries:
        if _is_dir(entry):
            if Path(entry.path) not in skip and Path(os.path.realpath(entry.path)) not in skip:
                folders.append(entry.name)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            return False, f"it holds images directly ({entry.name})"
    if not folders:
        return False, "it has no subfolders"
    for name in folders:
        problem = folder_problem(name)
        if problem is None and parse_folder_name(name).repeats > AUTO_MAX_REPEATS:  # type: ignore[union-attr]
            problem = f"folder {name!r} asks for more than {AUTO_MAX_REPEATS} repeats (a year or a date?)"
        if problem:
            return False, problem
    return True, f"every subfolder is named <repeats>_<name> ({', '.join(folders[:3])}{', …' * (len(folders) > 3)})"


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links, as the walk does
    except OSError:
        return False
