"""TFF h5 readers on small files written here in TFF's exact layout (examples/<client>/<feature>).

Every expected array is built in the test by a plain per-example Python loop that follows TFF's
preprocessing as documented, never by the reader's own vectorized code.
"""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedjax_sim.data.errors import DataError
from fedjax_sim.data.validation import validate_dataset
from fedjax_sim.datasets import load_dataset, tff_h5
from fedjax_sim.datasets.download import ChecksumError, MissingFileError
from fedjax_sim.datasets.vocab import CHAR_VOCAB, Vocabulary, lookup_words

BYTES = h5py.string_dtype(encoding="ascii")  # TFF stores strings as variable-length bytes


def write_h5(path, clients):
    """``{client_id: {feature: array or list of bytes}}`` -> TFF's h5 layout."""
    with h5py.File(path, "w") as file:
        group = file.create_group("examples")
        for client, features in clients.items():
            entry = group.create_group(client)
            for name, value in features.items():
                if isinstance(value, list):
                    entry.create_dataset(name, data=np.array(value, dtype=object), dtype=BYTES)
                else:
                    entry.create_dataset(name, data=value)
    return path


def emnist_clients(rng, sizes, num_classes=10):
    return {
        client: {
            "label": rng.integers(0, num_classes, n).astype(np.int32),
            "pixels": rng.random((n, 28, 28), dtype=np.float32),
        }
        for client, n in sizes.items()
    }


@pytest.fixture
def emnist_files(tmp_path):
    rng = np.random.default_rng(0)
    # Unsorted on purpose: TFF (and the reader) order clients by id.
    train = emnist_clients(rng, {"f0002_07": 3, "f0000_14": 2, "f0001_41": 4})
    test = emnist_clients(rng, {"f0000_14": 1, "f0002_07": 2, "f9999_99": 3})  # f9999: test only
    folder = tmp_path / "tff"
    folder.mkdir()
    write_h5(folder / "fed_emnist_digitsonly_train.h5", train)
    write_h5(folder / "fed_emnist_digitsonly_test.h5", test)
    return tmp_path, train, test


@pytest.mark.parametrize("cache", [False, True])
def test_emnist_returns_exactly_the_written_arrays(emnist_files, cache):
    data_dir, train, test = emnist_files
    dataset = load_dataset("tff_emnist", data_dir=str(data_dir), cache=cache)
    ids = sorted(train)
    assert dataset.train.client_ids.tolist() == ids
    np.testing.assert_array_equal(dataset.train.offsets, [0, 2, 6, 9])
    expected_x = np.concatenate([train[c]["pixels"] for c in ids])[..., None]
    np.testing.assert_array_equal(dataset.train.arrays["x"], expected_x)
    np.testing.assert_array_equal(dataset.train.arrays["y"],
                                  np.concatenate([train[c]["label"] for c in ids]))
    # Test split: in train order; f0001_41 has none; the test-only writer is left out.
    assert dataset.test.client_ids.tolist() == ids
    np.testing.assert_array_equal(dataset.test.client_sizes, [1, 0, 2])
    np.testing.assert_array_equal(
        dataset.test.arrays["x"][..., 0],
        np.concatenate([test["f0000_14"]["pixels"], test["f0002_07"]["pixels"]]))
    assert dataset.info["test_only_clients"] == 1
    assert dataset.info["num_classes"] == 10 and dataset.info["input_shape"] == (28, 28, 1)
    assert dataset.train.arrays["x"].dtype == np.float32
    assert dataset.train.arrays["y"].dtype == np.int32
    assert isinstance(dataset.train.arrays["x"], np.memmap) == cache
    validate_dataset(dataset)


def test_cache_is_reused_and_rebuilt_when_the_source_changes(emnist_files, tmp_path):
    data_dir, train, _ = emnist_files
    cache_dir = tmp_path / "my_cache"
    first = load_dataset("tff_emnist", data_dir=str(data_dir), cache_dir=str(cache_dir))
    folder = Path(first.info["cache"])
    assert folder.parent == cache_dir
    stamp = (folder / "meta.json").stat().st_mtime_ns
    again = load_dataset("tff_emnist", data_dir=str(data_dir), cache_dir=str(cache_dir))
    assert again.info["cache"] == str(folder)
    assert (folder / "meta.json").stat().st_mtime_ns == stamp  # opened, not rebuilt
    # Rewrite the train file with one more client: size and mtime change, the cache follows.
    train["f0003_00"] = emnist_clients(np.random.default_rng(5), {"x": 2})["x"]
    write_h5(data_dir / "tff" / "fed_emnist_digitsonly_train.h5", train)
    rebuilt = load_dataset("tff_emnist", data_dir=str(data_dir), cache_dir=str(cache_dir))
    assert rebuilt.train.num_clients == 4 and rebuilt.info["cache"] == str(folder)
    # Other options, other cache folder.
    other = load_dataset("tff_emnist", data_dir=str(data_dir), cache_dir=str(cache_dir),
                         train_file=str(data_dir / "tff" / "fed_emnist_digitsonly_test.h5"))
    assert other.info["cache"] != str(folder) and other.train.num_clients == 3


def shakespeare_reference(snippets, sequence_length):
    """TFF's char ids by a per-character loop: BOS + chars + EOS per snippet, packed, cut."""
    index = {c: i + 1 for i, c in enumerate(CHAR_VOCAB)}
    oov, bos, eos = len(CHAR_VOCAB) + 1, len(CHAR_VOCAB) + 2, len(CHAR_VOCAB) + 3
    stream = []
    for snippet in snippets:
        stream.append(bos)
        stream.extend(index.get(chr(b), oov) if b < 128 else oov for b in snippet)
        stream.append(eos)
    width = sequence_length + 1
    windows = []
    for start in range(0, len(stream), width):
        window = stream[start:start + width]
        windows.append(window + [0] * (width - len(window)))
    return np.array(windows, np.int32).reshape(-1, width)


def test_shakespeare_snippets_become_tff_character_sequences(tmp_path):
    train = {
        "THE_TRAGEDY_OF_KING_LEAR_KING": {"snippets": [b"Meantime we shall express our darker"
                                                       b" purpose.", b"Give me the map there."]},
        "ALLS_WELL_THAT_ENDS_WELL_HELENA": {"snippets": [b"O, were that all!\nI think not on"
                                                         b" my father; caf\xc3\xa9 {x}"]},
    }
    test = {"THE_TRAGEDY_OF_KING_LEAR_KING": {"snippets": [b"Know that we have divided"]}}
    write_h5(tmp_path / "shakespeare_train.h5", train)
    write_h5(tmp_path / "shakespeare_test.h5", test)
    dataset = load_dataset("tff_shakespeare", train_file=str(tmp_path / "shakespeare_train.h5"),
                           test_file=str(tmp_path / "shakespeare_test.h5"), sequence_length=10,
                           cache_dir=str(tmp_path / "cache"))
    ids = sorted(train)
    assert dataset.train.client_ids.tolist() == ids
    windows = [shakespeare_reference(train[c]["snippets"], 10) for c in ids]
    np.testing.assert_array_equal(dataset.train.client_sizes, [len(w) for w in windows])
    expected = np.concatenate(windows)
    np.testing.assert_array_equal(dataset.train.arrays["x"], expected[:, :-1])
    np.testing.assert_array_equal(dataset.train.arrays["y"], expected[:, 1:])
    test_windows = shakespeare_reference(test["THE_TRAGEDY_OF_KING_LEAR_KING"]["snippets"], 10)
    np.testing.assert_array_equal(dataset.test.client_sizes, [0, len(test_windows)])
    np.testing.assert_array_equal(dataset.test.arrays["x"], test_windows[:, :-1])
    assert dataset.info["num_classes"] == 90 and dataset.info["pad_label"] == 0
    validate_dataset(dataset)


# --- StackOverflow ----------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(10_000)]
WORDS[:6] = ["the", "to", ".", "i", "a", ","]
TAGS = {f"tag{i}": 10_000 - i for i in range(600)}
TAGS.update({"python": 20_000, "java": 19_000, "rare-tag": 1})


def stackoverflow_examples():
    """Two users' examples with TFF's features, including edge cases of the splitting rules."""
    long = " ".join(["the"] * 19 + ["w42", "w43", "w44"])  # 22 words: truncated, no EOS
    user_1 = {
        "tokens": [b"i like the  python . unknownword", long.encode(), b"", b"a"],
        "title": [b"how to  parse", b"java\tthreads", b"", b"q"],
        "tags": [b"python|rare-tag|java", b"java|tag0|tag1|tag2|tag3|tag4", b"", b"tag599"],
        "type": [b"question", b"answer", b"answer", b"question"],
    }
    user_2 = {
        "tokens": [b"w9999 w10000 ,"],
        "title": [b"w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21"],
        "tags": [b"tag10"],
        "type": [b"question"],
    }
    return {"00000010": user_1, "00000002": user_2}


def word_reference(tokens):
    """TFF's build_to_ids_fn for one example: split on ' ', 20 words, BOS/EOS, pad, shift."""
    index = {w: i + 1 for i, w in enumerate(WORDS)}
    words = tokens.decode().split(" ")[:20]
    ids = [index.get(w, 10_001) for w in words]
    if len(ids) < 20:
        ids.append(10_003)
    sequence = [10_002] + ids
    sequence += [0] * (21 - len(sequence))
    return sequence[:-1], sequence[1:]


def tag_reference(title, tokens, tags):
    index = {w: i + 1 for i, w in enumerate(WORDS)}
    words = (title + b" " + tokens).decode().split()[:20]
    x = [index.get(w, 10_001) for w in words] + [0] * (20 - min(20, len(words)))
    top = [t for t, _ in sorted(TAGS.items(), key=lambda item: item[1], reverse=True)][:500]
    y = [top.index(t) for t in tags.decode().split("|") if t in top][:5]
    return x, y + [-1] * (5 - len(y))


@pytest.fixture
def stackoverflow_dir(tmp_path):
    folder = tmp_path / "tff"
    folder.mkdir()
    examples = stackoverflow_examples()
    write_h5(folder / "stackoverflow_train.h5", examples)
    write_h5(folder / "stackoverflow_test.h5", {"00000002": examples["00000010"]})
    (folder / "stackoverflow.word_count").write_text(
        "".join(f"{w} {100_000 - i}\n" for i, w in enumerate(WORDS + ["extra", "words"])))
    (folder / "stackoverflow.tag_count").write_text(json.dumps(TAGS))
    return tmp_path, examples


def test_stackoverflow_next_word_matches_tff_preprocessing(stackoverflow_dir):
    data_dir, examples = stackoverflow_dir
    dataset = load_dataset("tff_stackoverflow", task="word", data_dir=str(data_dir))
    ids = sorted(examples)
    assert dataset.train.client_ids.tolist() == ids
    pairs = [word_reference(t) for c in ids for t in examples[c]["tokens"]]
    np.testing.assert_array_equal(dataset.train.arrays["x"], [x for x, _ in pairs])
    np.testing.assert_array_equal(dataset.train.arrays["y"], [y for _, y in pairs])
    assert dataset.train.arrays["x"].dtype == np.int32
    test_pairs = [word_reference(t) for t in examples["00000010"]["tokens"]]
    np.testing.assert_array_equal(dataset.test.client_sizes, [4, 0])
    np.testing.assert_array_equal(dataset.test.arrays["y"], [y for _, y in test_pairs])
    info = dataset.info
    assert (info["num_classes"], info["pad_label"], info["input_shape"]) == (10_004, 0, (20,))
    validate_dataset(dataset)


def test_stackoverflow_tag_task_follows_the_model_contract(stackoverflow_dir):
    data_dir, examples = stackoverflow_dir
    dataset = load_dataset("tff_stackoverflow", task="tag", data_dir=str(data_dir), cache=False)
    rows = [tag_reference(ti, to, ta) for c in sorted(examples)
            for ti, to, ta in zip(examples[c]["title"], examples[c]["tokens"],
                                  examples[c]["tags"], strict=True)]
    np.testing.assert_array_equal(dataset.train.arrays["x"], [x for x, _ in rows])
    np.testing.assert_array_equal(dataset.train.arrays["y"], [y for _, y in rows])
    assert dataset.train.arrays["y"].shape == (5, 5) and dataset.train.arrays["y"].dtype == np.int32
    info = dataset.info
    assert {k: info[k] for k in ("num_classes", "input_shape", "input_dtype", "task",
                                 "vocab_size")} == {
        "num_classes": 500, "input_shape": (20,), "input_dtype": "int32", "task": "multilabel",
        "vocab_size": 10_004}
    validate_dataset(dataset)


def test_vectorized_word_lookup_agrees_with_python_split():
    rng = np.random.default_rng(1)
    pieces = ["a", "bb", "ccc", "", "zz", "a-b"]
    vocab = ["a", "ccc", "a-b", "never"]
    index = {w: i for i, w in enumerate(vocab)}
    texts = [" ".join(rng.choice(pieces, rng.integers(0, 9))) + rng.choice(["", " ", "\t "])
             for _ in range(300)]
    for sep in (" ", None):
        ids, counts = lookup_words([t.encode() for t in texts], Vocabulary.of(vocab), 4,
                                   sep=sep and sep.encode())
        for text, row, count in zip(texts, ids, counts, strict=True):
            words = text.split(sep)
            assert count == len(words)
            expected = [index.get(w, -1) for w in words[:4]] + [-2] * (4 - min(4, len(words)))
            assert row.tolist() == expected, (text, sep)


# --- CIFAR-100 --------------------------------------------------------------------------------


def test_cifar100_is_cropped_and_standardized_like_tff(tmp_path):
    rng = np.random.default_rng(2)

    def clients(names, n):
        return {c: {"coarse_label": rng.integers(0, 20, n), "image": rng.integers(
            0, 256, (n, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 100, n)}
            for c in names}

    train, test = clients(["1", "0"], 3), clients(["7"], 2)
    write_h5(tmp_path / "fed_cifar100_train.h5", train)
    write_h5(tmp_path / "fed_cifar100_test.h5", test)
    dataset = load_dataset("tff_cifar100", train_file=str(tmp_path / "fed_cifar100_train.h5"),
                           test_file=str(tmp_path / "fed_cifar100_test.h5"), cache=False)

    def reference(image):  # resize_with_crop_or_pad(24, 24), per_image_standardization
        crop = image[4:28, 4:28, :].astype(np.float64)
        return (crop - crop.mean()) / max(crop.std(), 1 / np.sqrt(crop.size))

    expected = np.stack([reference(im) for c in ["0", "1"] for im in train[c]["image"]])
    np.testing.assert_allclose(dataset.train.arrays["x"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dataset.train.arrays["y"],
                                  np.concatenate([train["0"]["label"], train["1"]["label"]]))
    assert dataset.test is None
    np.testing.assert_array_equal(dataset.central_test["y"], test["7"]["label"])
    np.testing.assert_allclose(dataset.central_test["x"],
                               np.stack([reference(im) for im in test["7"]["image"]]),
                               rtol=1e-5, atol=1e-5)
    assert dataset.info["input_shape"] == (24, 24, 3)
    validate_dataset(dataset)


# --- errors -----------------------------------------------------------------------------------


def test_missing_file_names_the_file_the_archive_and_the_url(tmp_path):
    with pytest.raises(MissingFileError) as error:
        load_dataset("tff_emnist", data_dir=str(tmp_path), only_digits=False)
    message = str(error.value)
    for part in ("fed_emnist_train.h5", str(tmp_path / "tff"), "fed_emnist.tar.bz2",
                 "https://storage.googleapis.com/tff-datasets-public/fed_emnist.tar.bz2",
                 "download=True", "FEDJAX_SIM_DATA"):
        assert part in message, part


def tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_archive_with_a_wrong_checksum_is_refused(tmp_path):
    folder = tmp_path / "tff"
    folder.mkdir()
    (folder / "fed_cifar100.tar.bz2").write_bytes(tar_bytes({"fed_cifar100_train.h5": b"x"}))
    with pytest.raises(ChecksumError) as error:
        load_dataset("tff_cifar100", data_dir=str(tmp_path))
    message = str(error.value)
    assert str(folder / "fed_cifar100.tar.bz2") in message
    assert tff_h5.ARCHIVES["fed_cifar100"].sha256 in message
    assert not (folder / "fed_cifar100_train.h5").exists()


def test_archive_is_extracted_safely(tmp_path, emnist_files, monkeypatch):
    data_dir, train, _ = emnist_files
    folder = data_dir / "tff"
    contents = {name: (folder / name).read_bytes() for name in
                ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5")}
    for name in contents:
        (folder / name).unlink()
    archive = tar_bytes({
        "../../evil.h5": b"evil",
        "datasets/fed_emnist_digitsonly_train.h5": contents["fed_emnist_digitsonly_train.h5"],
        "fed_emnist_digitsonly_test.h5": contents["fed_emnist_digitsonly_test.h5"],
    })
    (folder / "fed_emnist_digitsonly.tar.bz2").write_bytes(archive)
    spec = tff_h5.ARCHIVES["fed_emnist_digitsonly"]
    monkeypatch.setitem(tff_h5.ARCHIVES, "fed_emnist_digitsonly", tff_h5.Archive(
        spec.name, hashlib.sha256(archive).hexdigest(), spec.members))
    dataset = load_dataset("tff_emnist", data_dir=str(data_dir), cache=False)
    assert dataset.train.client_ids.tolist() == sorted(train)
    assert (folder / "fed_emnist_digitsonly_train.h5").read_bytes() == \
        contents["fed_emnist_digitsonly_train.h5"]
    assert not list(tmp_path.rglob("evil.h5"))
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def test_archive_member_escaping_the_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "tff"
    folder.mkdir(parents=True)
    archive = tar_bytes({"../shakespeare_train.h5": b"x", "shakespeare_test.h5": b"y"})
    (folder / "shakespeare.tar.bz2").write_bytes(archive)
    spec = tff_h5.ARCHIVES["shakespeare"]
    monkeypatch.setitem(tff_h5.ARCHIVES, "shakespeare", tff_h5.Archive(
        spec.name, hashlib.sha256(archive).hexdigest(), spec.members))
    with pytest.raises(DataError, match=r"shakespeare\.tar\.bz2: cannot unpack it"):
        load_dataset("tff_shakespeare", data_dir=str(tmp_path / "data"))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["shakespeare.tar.bz2"]


@pytest.mark.parametrize(
    "clients, expected",
    [
        ({"f1": {"pixels": np.zeros((2, 28, 28), np.float32)}},
         "client 'f1' has no feature 'label' (['pixels']); expected examples/f1/label: [n] "
         "integers"),
        ({"f1": {"label": np.zeros(2, np.int32), "pixels": np.zeros((2, 28, 27), np.float32)}},
         "client 'f1', feature 'pixels' has shape (2, 28, 27) and dtype float32; expected "
         "[n, 28, 28] floats"),
        ({"f1": {"label": np.zeros(2, np.float32), "pixels": np.zeros((2, 28, 28), np.float32)}},
         "client 'f1', feature 'label' has shape (2,) and dtype float32; expected [n] integers"),
        ({"f1": {"label": np.zeros(3, np.int32), "pixels": np.zeros((2, 28, 28), np.float32)}},
         "client 'f1', feature 'label' has 3 examples, its other features 2"),
    ],
)
def test_wrong_layout_names_the_file_the_client_and_what_was_expected(tmp_path, clients,
                                                                      expected):
    path = write_h5(tmp_path / "train.h5", clients)
    with pytest.raises(DataError) as error:
        load_dataset("tff_emnist", train_file=str(path), test_file=str(path), cache=False)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_file_without_examples_group_or_not_h5(tmp_path):
    path = tmp_path / "train.h5"
    with h5py.File(path, "w") as file:
        file.create_group("clients")
    with pytest.raises(DataError, match=r"train\.h5: no group 'examples' \(top level holds "
                                        r"\['clients'\]\); expected TFF's h5 layout"):
        load_dataset("tff_emnist", train_file=str(path), test_file=str(path), cache=False)
    path.write_bytes(b"not hdf5")
    with pytest.raises(DataError, match=r"train\.h5: not a readable HDF5 file"):
        load_dataset("tff_emnist", train_file=str(path), test_file=str(path), cache=False)


def test_bad_count_files_name_the_file(stackoverflow_dir):
    data_dir, _ = stackoverflow_dir
    (data_dir / "tff" / "stackoverflow.word_count").write_text("the 10\nonly 3\n")
    with pytest.raises(DataError, match=r"stackoverflow\.word_count: 2 words, expected at least "
                                        r"10000"):
        load_dataset("tff_stackoverflow", data_dir=str(data_dir), cache=False)
    (data_dir / "tff" / "stackoverflow.tag_count").write_text("[1, 2]")
    (data_dir / "tff" / "stackoverflow.word_count").write_text(
        "".join(f"{w} 1\n" for w in WORDS))
    with pytest.raises(DataError, match=r"stackoverflow\.tag_count: expected a JSON object"):
        load_dataset("tff_stackoverflow", task="tag", data_dir=str(data_dir), cache=False)
