"""Tests of the Shakespeare-by-role loader against hand-written expectations.

Parser inputs are excerpts copied from the packaged play files (the file and line numbers are
given); a play is only parsed after its locale line (``SCENE: ...``), so excerpts from the middle
of a play are preceded by that play's own locale line.
"""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pytest

from fedjax_sim.datasets import shakespeare
from fedjax_sim.datasets.shakespeare import (
    lines_by_role,
    load_shakespeare,
    parse_play,
    shakespeare_report,
    snippets_to_sequences,
)
from fedjax_sim.datasets.vocab import (
    BOS_ID,
    CHAR_VOCAB,
    EOS_ID,
    OOV_ID,
    PAD_ID,
    VOCAB_SIZE,
    char_ids,
)

# The literal from tensorflow_federated/python/simulation/baselines/shakespeare/
# char_prediction_preprocessing.py.
TFF_CHAR_VOCAB = list(
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r"
)


def decode(ids: np.ndarray) -> str:
    """Ids back to text: BOS -> "<", EOS -> ">", OOV -> "~", PAD -> ""."""
    table = [""] + list(CHAR_VOCAB) + ["~", "<", ">"]
    return "".join(table[i] for i in np.asarray(ids).ravel())


# --- vocabulary and ids ---------------------------------------------------------------------------


def test_vocabulary_is_tffs():
    assert CHAR_VOCAB == tuple(TFF_CHAR_VOCAB)
    assert len(CHAR_VOCAB) == 86
    assert (PAD_ID, OOV_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (0, 87, 88, 89, 90)


def test_char_ids_by_hand():
    # Positions in the TFF string, plus one because 0 pads: W=31, h=1, o=23, '=35, s=24,
    # space=13, t=4, e=64, r=45, ?=40.
    expected = [32, 2, 24, 36, 25, 14, 5, 2, 65, 46, 65, 41]
    np.testing.assert_array_equal(char_ids("Who's there?"), expected)
    assert char_ids("Who's there?").dtype == np.int32
    # Not in the vocabulary: OOV; a non-ASCII character is one OOV per UTF-8 byte (TFF splits
    # bytes).
    np.testing.assert_array_equal(char_ids("a~"), [64, 87])
    np.testing.assert_array_equal(char_ids("\u00e9"), [87, 87])


def test_sequences_bos_eos_padding_and_shift():
    # "Hi" -> BOS 9 66 EOS, "d!" -> BOS 1 79 EOS: 8 tokens, windows of 5, the last one padded.
    x, y = snippets_to_sequences(["Hi", "d!"], sequence_length=4)
    np.testing.assert_array_equal(x, [[88, 9, 66, 89], [1, 79, 89, 0]])
    np.testing.assert_array_equal(y, [[9, 66, 89, 88], [79, 89, 0, 0]])
    assert x.dtype == y.dtype == np.int32
    # A stream that fills its windows exactly gets no padding and no extra window.
    x, y = snippets_to_sequences(["Hi"], sequence_length=3)
    np.testing.assert_array_equal(x, [[88, 9, 66]])
    np.testing.assert_array_equal(y, [[9, 66, 89]])
    # No snippets, no sequences.
    x, y = snippets_to_sequences([], sequence_length=3)
    assert x.shape == y.shape == (0, 3)


def test_sequences_long_stream_pads_only_the_last_window():
    snippets = ["To be, or not to be, that is the question:"] * 7
    x, y = snippets_to_sequences(snippets, sequence_length=80)
    tokens = 7 * (42 + 2)
    assert x.shape == (-(-tokens // 81), 80)
    windows = np.concatenate([x[:, :1], y], axis=1)
    assert np.count_nonzero(windows[:-1] == PAD_ID) == 0
    assert np.count_nonzero(windows[-1] == PAD_ID) == x.shape[0] * 81 - tokens
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert decode(windows) == "".join(f"<{s}>" for s in snippets)


# --- parser on real excerpts ----------------------------------------------------------------------

# hamlet_gut.txt lines 39-92: the locale line, act and scene headers, labels on their own line.
HAMLET_OPENING = """SCENE. Elsinore.



ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

Fran.
Bernardo?

Ber.
He.

Fran.
You come most carefully upon your hour.

Ber.
'Tis now struck twelve. Get thee to bed, Francisco.

Fran.
For this relief much thanks: 'tis bitter cold,
And I am sick at heart.

Ber.
Have you had quiet guard?

Fran.
Not a mouse stirring.

Ber.
Well, good night.
If you do meet Horatio and Marcellus,
The rivals of my watch, bid them make haste.

Fran.
I think I hear them.--Stand, ho! Who is there?

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.
"""


def test_parse_hamlet_opening():
    assert parse_play(HAMLET_OPENING) == [
        ("BER", "Who's there?"),
        ("FRAN", "Nay, answer me: stand, and unfold yourself."),
        ("BER", "Long live the king!"),
        ("FRAN", "Bernardo?"),
        ("BER", "He."),
        ("FRAN", "You come most carefully upon your hour."),
        ("BER", "'Tis now struck twelve. Get thee to bed, Francisco."),
        ("FRAN", "For this relief much thanks: 'tis bitter cold,"),
        ("FRAN", "And I am sick at heart."),
        ("BER", "Have you had quiet guard?"),
        ("FRAN", "Not a mouse stirring."),
        ("BER", "Well, good night."),
        ("BER", "If you do meet Horatio and Marcellus,"),
        ("BER", "The rivals of my watch, bid them make haste."),
        ("FRAN", "I think I hear them.--Stand, ho! Who is there?"),
        ("HOR", "Friends to this ground."),
    ]


# hamlet_gut.txt line 39 (locale), then lines 460-469 and 714-729: an inline `[Aside.]` and a
# joint label.
HAMLET_ASIDE_AND_JOINT = """SCENE. Elsinore.

King.
Take thy fair hour, Laertes; time be thine,
And thy best graces spend it at thy will!--
But now, my cousin Hamlet, and my son--

Ham.
[Aside.] A little more than kin, and less than kind!

King.
How is it that the clouds still hang on you?

Ham.
Indeed, indeed, sirs, but this troubles me.
Hold you the watch to-night?

Mar. and Ber.
We do, my lord.

Ham.
Arm'd, say you?

Both.
Arm'd, my lord.
"""


def test_parse_inline_direction_and_joint_label():
    assert lines_by_role(HAMLET_ASIDE_AND_JOINT) == {
        "KING": [
            "Take thy fair hour, Laertes; time be thine,",
            "And thy best graces spend it at thy will!--",
            "But now, my cousin Hamlet, and my son--",
            "How is it that the clouds still hang on you?",
        ],
        "HAM": [
            "A little more than kin, and less than kind!",
            "Indeed, indeed, sirs, but this troubles me.",
            "Hold you the watch to-night?",
            "Arm'd, say you?",
        ],
        "MAR. AND BER": ["We do, my lord."],
        "BOTH": ["Arm'd, my lord."],
    }


# cymbeline_gut.txt line 39 (locale), then lines 141-152: an inline label.
CYMBELINE_INLINE = """SCENE: Britain; Rome.

SECOND GENTLEMAN.
How long is this ago?

FIRST GENTLEMAN. Some twenty years.

SECOND GENTLEMAN.
That a king's children should be so convey'd,
So slackly guarded, and the search so slow,
That could not trace them!

FIRST GENTLEMAN.
Howsoe'er 'tis strange,
"""


def test_parse_inline_label():
    assert parse_play(CYMBELINE_INLINE) == [
        ("SECOND GENTLEMAN", "How long is this ago?"),
        ("FIRST GENTLEMAN", "Some twenty years."),
        ("SECOND GENTLEMAN", "That a king's children should be so convey'd,"),
        ("SECOND GENTLEMAN", "So slackly guarded, and the search so slow,"),
        ("SECOND GENTLEMAN", "That could not trace them!"),
        ("FIRST GENTLEMAN", "Howsoe'er 'tis strange,"),
    ]


# cymbeline_gut.txt line 39 (locale), then lines 1403-1421: a combined act and scene header
# ends Imogen's speech; the place line after it belongs to nobody.
CYMBELINE_ACT_HEADER = """SCENE: Britain; Rome.

IMOGEN.
I will write.
Send your trunk to me; it shall safe be kept,
And truly yielded you. You're very welcome.

[Exeunt.]




ACT II. SCENE I.

Britain. Before CYMBELINE'S palace.

[Enter CLOTEN and the two LORDS.]

CLOTEN.
Was there ever man had such luck! When I kiss'd the jack,
"""


def test_parse_header_ends_speech():
    assert lines_by_role(CYMBELINE_ACT_HEADER) == {
        "IMOGEN": [
            "I will write.",
            "Send your trunk to me; it shall safe be kept,",
            "And truly yielded you. You're very welcome.",
        ],
        "CLOTEN": ["Was there ever man had such luck! When I kiss'd the jack,"],
    }


# midsummer_nights_dream_gut.txt lines 42-75: labels without a period, an indented half line,
# and a speech that goes on after a stage direction.
MIDSUMMER_OPENING = """SCENE: Athens, and a wood not far from it.

ACT I.

SCENE I. Athens. A room in the Palace of THESEUS.

[Enter THESEUS, HIPPOLYTA, PHILOSTRATE, and Attendants.]

THESEUS
Now, fair Hippolyta, our nuptial hour
Draws on apace; four happy days bring in
Another moon; but, oh, methinks, how slow
This old moon wanes! she lingers my desires,
Like to a step-dame or a dowager,
Long withering out a young man's revenue.

HIPPOLYTA
Four days will quickly steep themselves in nights;
Four nights will quickly dream away the time;
And then the moon, like to a silver bow
New bent in heaven, shall behold the night
Of our solemnities.

THESEUS
                    Go, Philostrate,
Stir up the Athenian youth to merriments;
Awake the pert and nimble spirit of mirth;
Turn melancholy forth to funerals--
The pale companion is not for our pomp. --

[Exit PHILOSTRATE.]

Hippolyta, I woo'd thee with my sword,
And won thy love doing thee injuries;
"""


def test_parse_labels_without_period_and_speech_after_direction():
    assert lines_by_role(MIDSUMMER_OPENING) == {
        "THESEUS": [
            "Now, fair Hippolyta, our nuptial hour",
            "Draws on apace; four happy days bring in",
            "Another moon; but, oh, methinks, how slow",
            "This old moon wanes! she lingers my desires,",
            "Like to a step-dame or a dowager,",
            "Long withering out a young man's revenue.",
            "Go, Philostrate,",
            "Stir up the Athenian youth to merriments;",
            "Awake the pert and nimble spirit of mirth;",
            "Turn melancholy forth to funerals--",
            "The pale companion is not for our pomp. --",
            "Hippolyta, I woo'd thee with my sword,",
            "And won thy love doing thee injuries;",
        ],
        "HIPPOLYTA": [
            "Four days will quickly steep themselves in nights;",
            "Four nights will quickly dream away the time;",
            "And then the moon, like to a silver bow",
            "New bent in heaven, shall behold the night",
            "Of our solemnities.",
        ],
    }


# coriolanus_gut.txt lines 36-51: a locale line that wraps, a two-line stage direction.
CORIOLANUS_OPENING = """SCENE: Partly in Rome, and partly in the territories of the
Volscians and Antiates.


ACT I.

SCENE I. Rome. A street.

[Enter a company of mutinous citizens, with staves, clubs, and
other weapons.]

FIRST CITIZEN.
Before we proceed any further, hear me speak.

ALL.
Speak, speak.
"""


def test_parse_multiline_direction():
    assert parse_play(CORIOLANUS_OPENING) == [
        ("FIRST CITIZEN", "Before we proceed any further, hear me speak."),
        ("ALL", "Speak, speak."),
    ]


def test_parse_needs_a_play():
    with pytest.raises(ValueError, match="SCENE"):
        parse_play("no play here\n")


# --- loading --------------------------------------------------------------------------------------

TINY_PLAY = """TINY

by William Shakespeare

SCENE: Nowhere.

ACT I.

SCENE I. A room.

[Enter ANNA and BOB.]

ANNA.
Hi
Hi
Hi
Hi
d!

BOB.
Hi
"""


def write_corpus(directory, files: dict[str, str]) -> None:
    rows = ["file\ttitle\tgutenberg_url_per_package_metadata\tbytes\tsha256"]
    for name, text in files.items():
        data = text.encode()
        (directory / name).write_bytes(data)
        rows.append(f"{name}\t{name}\t-\t{len(data)}\t{hashlib.sha256(data).hexdigest()}")
    (directory / "SOURCES.tsv").write_text("\n".join(rows) + "\n")


def test_load_tiny_corpus_splits_each_role_by_position(tmp_path):
    write_corpus(tmp_path, {"tiny_gut.txt": TINY_PLAY})
    dataset = load_shakespeare(sequence_length=4, test_fraction=0.2, plays_dir=str(tmp_path))
    train, test = dataset.train, dataset.test
    assert list(train.client_ids) == ["tiny_gut:ANNA", "tiny_gut:BOB"]
    assert list(test.client_ids) == list(train.client_ids)
    # ANNA: 5 lines, floor(5 * 0.8) = 4 train ("Hi" x 4 = 16 tokens -> 4 windows of 5, the
    # last with 4 PADs); her last line "d!" is the test set.
    hi = [88, 9, 66, 89]
    anna_train = np.concatenate([train.client(0)["x"][:, :1], train.client(0)["y"]], axis=1)
    np.testing.assert_array_equal(anna_train.ravel(), hi * 4 + [0] * 4)
    np.testing.assert_array_equal(test.client(0)["x"], [[88, 1, 79, 89]])
    np.testing.assert_array_equal(test.client(0)["y"], [[1, 79, 89, 0]])
    # BOB: one line, so one training window and an empty test set.
    np.testing.assert_array_equal(train.client(1)["x"], [hi])
    assert test.client_sizes.tolist() == [1, 0]
    assert dataset.info["num_classes"] == dataset.info["vocab_size"] == 90
    assert dataset.info["pad_label"] == 0
    assert dataset.info["input_shape"] == (4,)
    assert dataset.central_test is None

    # Bob has 1 training sequence, Anna 4: asking for 2 drops Bob from train and test.
    dataset = load_shakespeare(sequence_length=4, min_train_sequences=2, plays_dir=str(tmp_path))
    assert list(dataset.train.client_ids) == ["tiny_gut:ANNA"]
    assert list(dataset.test.client_ids) == ["tiny_gut:ANNA"]
    assert dataset.test.num_examples == 1


@pytest.fixture(scope="module")
def corpus():
    return load_shakespeare()


def test_packaged_corpus_loads(corpus):
    report = shakespeare_report(corpus)
    assert report["plays"] == 37
    assert 1000 < report["clients"] < 1600  # LEAF finds 1,129 roles in Gutenberg's edition
    assert 40_000 < report["train_sequences"] < 60_000
    assert 8_000 < report["test_sequences"] < 16_000
    assert 3_800_000 < report["characters"] < 4_600_000  # 4.85 MB of files
    assert report["train_sequences_per_client"]["min"] >= 1
    assert corpus.train.client_sizes.min() >= 1
    for data in (corpus.train, corpus.test):
        assert data.arrays["x"].shape[1:] == (80,) and data.arrays["x"].dtype == np.int32
        np.testing.assert_array_equal(data.arrays["x"][:, 1:], data.arrays["y"][:, :-1])
    ids = set(corpus.train.client_ids.tolist())
    assert {
        "hamlet_gut:HAM",
        "macbeth_gut:LADY MACBETH",
        "merry_wives_of_windsor_gut:MRS. PAGE",
        "midsummer_nights_dream_gut:THESEUS",
        "hamlet_gut:MAR. AND BER",
    } <= ids


def test_packaged_corpus_has_no_directions_or_headers(corpus):
    bracket_ids = [CHAR_VOCAB.index("[") + 1, CHAR_VOCAB.index("]") + 1]
    for data in (corpus.train, corpus.test):
        assert np.isin(data.arrays["y"], bracket_ids).sum() == 0
    windows = np.concatenate([corpus.train.arrays["x"][:, :1], corpus.train.arrays["y"]], axis=1)
    lines = decode(windows).replace("><", "\n").strip("<>")
    header = re.compile(
        r"^(?:ACT|Act|SCENE|Scene)\s+(?:[IVX]+|\d+)\b|^(?:Enter|Exeunt) [A-Z]+", re.MULTILINE
    )
    assert header.findall(lines) == []


def test_packaged_test_split_is_the_roles_last_lines(corpus):
    # Francisco speaks 10 lines, all in Hamlet I.1: lines 9 and 10 are his test set.
    index = corpus.test.client_ids.tolist().index("hamlet_gut:FRAN")
    assert decode(corpus.test.client(index)["x"]) == (
        "<Bernardo has my place.><Give you good-night.>"
    )
    train = corpus.train.client(index)
    assert decode(train["x"][:1])[:45] == "<Nay, answer me: stand, and unfold yourself.>"


def test_packaged_files_match_published_checksums():
    # sha256 from the shared data README, independent of SOURCES.tsv.
    plays = shakespeare.DEFAULT_PLAYS_DIR
    expected = {
        "hamlet_gut.txt": "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
        "macbeth_gut.txt": "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
        "winters_tale_gut.txt": "06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393",
    }
    for name, sha in expected.items():
        assert hashlib.sha256((plays / name).read_bytes()).hexdigest() == sha
    assert len(list(plays.glob("*_gut.txt"))) == 37
    assert len(shakespeare.read_sources()) == 37


def test_checksum_mismatch_names_the_file(tmp_path):
    plays = tmp_path / "plays"
    shutil.copytree(shakespeare.DEFAULT_PLAYS_DIR, plays)
    path = plays / "macbeth_gut.txt"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x20  # change one byte
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"macbeth_gut\.txt.*54e1d8055ffa2aec"):
        load_shakespeare(plays_dir=str(plays))
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"macbeth_gut\.txt"):
        load_shakespeare(plays_dir=str(plays))
    with pytest.raises(FileNotFoundError, match="SOURCES.tsv"):
        load_shakespeare(plays_dir=str(tmp_path))


def test_bad_options():
    with pytest.raises(ValueError, match="sequence_length"):
        load_shakespeare(sequence_length=0)
    with pytest.raises(ValueError, match="test_fraction"):
        load_shakespeare(test_fraction=1.0)
