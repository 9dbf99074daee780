"""LEAF JSON files written here in LEAF's layout (3 users each), read back exactly.

References are independent of the loader: per-user loops over what the test wrote, a plain
``re.findall`` per tweet for Sent140, Pillow image by image for CelebA.
"""

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedjax_sim.cli import main
from fedjax_sim.data.errors import DataError
from fedjax_sim.data.validation import validate_dataset
from fedjax_sim.datasets import leaf, load_dataset
from fedjax_sim.datasets import vocab as char_vocab

ROOT = Path(__file__).resolve().parents[2]
USERS = ["f0001_41", "f0002_07", "f0003_19"]


def write_leaf(path: Path, users: dict[str, tuple[list, list]], extra: dict | None = None):
    """One LEAF JSON file: ``{user: (x list, y list)}`` in LEAF's key order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "users": list(users),
        "num_samples": [len(y) for _, y in users.values()],
        "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
        **(extra or {}),
    }
    path.write_text(json.dumps(data))
    return data


def base(tmp_path: Path, task: str) -> Path:
    return tmp_path / "leaf" / task / "data"


# --- FEMNIST --------------------------------------------------------------------------------------


def femnist_users(sizes, seed=0):
    rng = np.random.default_rng(seed)
    users = {}
    for user, n in zip(USERS, sizes, strict=True):
        x = (rng.integers(0, 256, (n, 784)) / 255).tolist()  # LEAF: vec / 255, as Python floats
        y = rng.integers(0, 62, n).tolist()
        users[user] = (x, y)
    return users


def test_femnist_split_files_read_back_exactly(tmp_path):
    train = femnist_users([5, 3, 7], seed=1)
    test = femnist_users([2, 0, 1], seed=2)
    # Two train files (LEAF writes at most 100 writers per file), users spread over them.
    write_leaf(base(tmp_path, "femnist") / "train" / "all_data_0_niid_0_keep_0_train_9.json",
               {u: train[u] for u in USERS[:2]})
    write_leaf(base(tmp_path, "femnist") / "train" / "all_data_1_niid_0_keep_0_train_9.json",
               {USERS[2]: train[USERS[2]]})
    write_leaf(base(tmp_path, "femnist") / "test" / "all_data_0_niid_0_keep_0_test_9.json", test)
    dataset = leaf.load_leaf_femnist(data_dir=tmp_path)
    validate_dataset(dataset)
    assert dataset.name == "leaf_femnist"
    assert dataset.train.client_ids.tolist() == USERS
    assert dataset.train.client_sizes.tolist() == [5, 3, 7]
    assert dataset.test.client_ids.tolist() == USERS
    assert dataset.test.client_sizes.tolist() == [2, 0, 1]
    assert dataset.central_test is None
    for split, written in ((dataset.train, train), (dataset.test, test)):
        for i, user in enumerate(USERS):
            x, y = written[user]
            client = split.client(i)
            expected = np.asarray(x, np.float32).reshape(-1, 28, 28, 1)
            np.testing.assert_array_equal(client["x"], expected)
            np.testing.assert_array_equal(client["y"], np.asarray(y, np.int32))
    assert dataset.train.arrays["x"].dtype == np.float32
    assert dataset.train.arrays["y"].dtype == np.int32
    # Row-major 28x28: value k of the 784 is pixel (k // 28, k % 28).
    assert dataset.train.client(0)["x"][1, 3, 5, 0] == np.float32(train[USERS[0]][0][1][3 * 28 + 5])
    assert dataset.info["num_classes"] == 62 and dataset.info["input_shape"] == (28, 28, 1)
    assert dataset.info["class_names"][10] == "A" and dataset.info["class_names"][36] == "a"
    assert dataset.info["test_examples_dropped"] == 0


def test_all_data_is_split_per_client(tmp_path):
    data = femnist_users([10, 4, 6])
    write_leaf(base(tmp_path, "femnist") / "all_data" / "all_data_0.json", data)
    dataset = leaf.load_leaf_femnist(data_dir=tmp_path, test_fraction=0.25, seed=3)
    validate_dataset(dataset)
    assert dataset.train.client_sizes.tolist() == [7, 3, 4]  # floor(n * 0.75), at least 1
    assert dataset.test.client_sizes.tolist() == [3, 1, 2]
    for i, user in enumerate(USERS):  # each client's train + test = its examples, shuffled
        joined = np.concatenate([dataset.train.client(i)["x"], dataset.test.client(i)["x"]])
        expected = np.asarray(data[user][0], np.float32).reshape(-1, 28, 28, 1)
        key = lambda a: np.sort(a.reshape(len(a), -1) @ np.arange(784.0))  # noqa: E731
        np.testing.assert_array_equal(key(joined), key(expected))
    whole = leaf.load_leaf_femnist(data_dir=tmp_path, test_fraction=0.0)
    assert whole.test is None and whole.train.client_sizes.tolist() == [10, 4, 6]
    # source="split" insists on LEAF's train/ + test/ folders.
    with pytest.raises(FileNotFoundError, match=r"no \*\.json in .*femnist/data/train"):
        leaf.load_leaf_femnist(data_dir=tmp_path, source="split")


def test_user_split_goes_to_the_central_test_set(tmp_path):
    """LEAF's ``-t user``: test users are other users; they form the central test set."""
    train = femnist_users([3, 2, 4])
    test = {f"t{u}": v for u, v in femnist_users([1, 2, 2], seed=5).items()}
    write_leaf(base(tmp_path, "femnist") / "train" / "a.json", train)
    write_leaf(base(tmp_path, "femnist") / "test" / "a.json", test)
    dataset = leaf.load_leaf_femnist(data_dir=tmp_path)
    validate_dataset(dataset)
    assert dataset.test is None
    expected_y = np.concatenate([np.asarray(y) for _, y in test.values()])
    np.testing.assert_array_equal(dataset.central_test["y"], expected_y)
    assert dataset.central_test["x"].shape == (5, 28, 28, 1)


def test_users_without_train_examples_are_dropped(tmp_path):
    train = femnist_users([3, 0, 2])
    test = femnist_users([1, 1, 1], seed=4)
    test["stranger"] = test.pop(USERS[2])  # a test user with no train user: dropped, counted
    write_leaf(base(tmp_path, "femnist") / "train" / "a.json", train)
    write_leaf(base(tmp_path, "femnist") / "test" / "a.json", test)
    dataset = leaf.load_leaf_femnist(data_dir=tmp_path)
    validate_dataset(dataset)
    assert dataset.train.client_ids.tolist() == [USERS[0], USERS[2]]
    assert dataset.test.client_sizes.tolist() == [1, 0]
    # Dropped: the stranger's test example and the one of USERS[1] (no train examples).
    kept = dataset.test.num_examples
    assert kept + dataset.info["test_examples_dropped"] == sum(len(y) for _, y in test.values())
    assert dataset.info["test_examples_dropped"] == 2


def test_a_user_in_two_files_is_one_client(tmp_path):
    data = femnist_users([2, 3, 1])
    write_leaf(base(tmp_path, "femnist") / "all_data" / "a.json", {u: data[u] for u in USERS[:2]})
    write_leaf(base(tmp_path, "femnist") / "all_data" / "b.json",
               {USERS[0]: femnist_users([4, 1, 1], seed=9)[USERS[0]], USERS[2]: data[USERS[2]]})
    dataset = leaf.load_leaf_femnist(data_dir=tmp_path, test_fraction=0.0)
    assert dataset.train.client_ids.tolist() == USERS
    assert dataset.train.client_sizes.tolist() == [6, 3, 1]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"a\.json: not valid JSON"),
        ('{"users": [], "user_data": {}}', r"a\.json: has \['user_data', 'users'\], expected a "
                                           r"LEAF file"),
        ('{"users": ["u"], "num_samples": [1], "user_data": {}}',
         r"a\.json: user 'u' has no user_data entry"),
        ('{"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[0.5]], "y": [1]}}}',
         r"a\.json: user 'u' has 1 x and 1 y for num_samples 2"),
        ('{"users": ["u"], "num_samples": [1, 2], "user_data": {}}',
         r"a\.json: 1 users but 2 num_samples"),
        ('{"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[0.5], [0.1, 0.2]], '
         '"y": [1, 2]}}}', r"a\.json: FEMNIST images must be lists of 784 numbers"),
        ('{"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.5]], "y": [1]}}}',
         r"a\.json: FEMNIST images have shape \(1,\), expected lists of 784 numbers"),
        ('{"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[' + ",".join(["0"] * 784)
         + ']], "y": [62]}}}', r"a\.json: labels span \[62, 62\], expected \[0, 62\)"),
    ],
    ids=["json", "keys", "user", "count", "lengths", "ragged", "short", "label"],
)
def test_bad_files_name_the_file_and_the_problem(content, message, tmp_path):
    path = base(tmp_path, "femnist") / "all_data" / "a.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        leaf.load_leaf_femnist(data_dir=tmp_path)


def test_missing_data_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        leaf.load_leaf_femnist(data_dir=tmp_path)
    message = str(error.value)
    folder = tmp_path / "leaf" / "femnist" / "data"
    assert str(folder / "train") in message and str(folder / "all_data") in message
    assert "git clone https://github.com/TalwalkarLab/leaf" in message
    assert "cd leaf/data/femnist && ./preprocess.sh -s niid --sf 1.0 -k 0 -t sample" in message
    assert "FEDJAX_SIM_DATA" in message and "dataset.data_dir" in message
    with pytest.raises(FileNotFoundError, match=r"img_align_celeba/ image folder from CelebA"):
        leaf.load_leaf_celeba(data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"source must be one of"):
        leaf.load_leaf_femnist(data_dir=tmp_path, source="train")


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    write_leaf(base(tmp_path, "femnist") / "all_data" / "a.json", femnist_users([2, 2, 2]))
    monkeypatch.setenv("FEDJAX_SIM_DATA", str(tmp_path))
    dataset = load_dataset("leaf_femnist", test_fraction=0.0)
    assert dataset.train.num_examples == 6


# --- Shakespeare ----------------------------------------------------------------------------------

TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer "
    "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles "
    "— café }> And by opposing end them."
)


def shakespeare_users():
    """LEAF's layout: 80-character windows of a role's text, y = the next character."""
    users = {}
    for u, start in zip(["THE_TRAGEDY_OF_HAMLET_HAMLET", "KING_LEAR_EDGAR", "MACBETH_WITCH"],
                        [0, 17, 41], strict=True):
        text = TEXT[start:] + TEXT[:start]
        n = 3 + start % 4
        users[u] = ([text[i:i + 80] for i in range(n)], [text[i + 80] for i in range(n)])
    return users


def reference_ids(text: str) -> list[int]:
    """TFF's ids by hand: vocabulary position + 1, anything else OOV."""
    vocab = char_vocab.CHAR_VOCAB
    return [vocab.index(c) + 1 if c in vocab else char_vocab.OOV_ID for c in text]


@pytest.mark.parametrize("targets", ["all", "last"])
def test_shakespeare_sequences(targets, tmp_path):
    users = shakespeare_users()
    write_leaf(base(tmp_path, "shakespeare") / "train" / "a.json", users,
               extra={"hierarchies": ["HAMLET", "KING LEAR", "MACBETH"]})
    write_leaf(base(tmp_path, "shakespeare") / "test" / "a.json",
               {u: (x[:1], y[:1]) for u, (x, y) in users.items()})
    dataset = leaf.load_leaf_shakespeare(data_dir=tmp_path, targets=targets)
    validate_dataset(dataset)
    assert dataset.train.client_ids.tolist() == list(users)
    for i, (x, y) in enumerate(users.values()):
        client = dataset.train.client(i)
        assert client["x"].shape == (len(x), 80) and client["x"].dtype == np.int32
        for j, (window, nxt) in enumerate(zip(x, y, strict=True)):
            assert client["x"][j].tolist() == reference_ids(window)
            if targets == "all":
                assert client["y"][j].tolist() == reference_ids(window[1:] + nxt)
            else:
                assert client["y"][j].tolist() == [0] * 79 + reference_ids(nxt)
    info = dataset.info
    assert info["num_classes"] == 90 and info["pad_label"] == 0 and info["input_shape"] == (80,)
    assert info["input_dtype"] == "int32" and info["targets"] == targets
    # Non-ASCII characters are one OOV id each (the window keeps its 80 positions).
    assert "é" in TEXT and reference_ids("é") == [char_vocab.OOV_ID]


def test_shakespeare_bad_lengths(tmp_path):
    users = shakespeare_users()
    first = next(iter(users))
    users[first][0][1] = users[first][0][1][:79]
    write_leaf(base(tmp_path, "shakespeare") / "all_data" / "a.json", users)
    with pytest.raises(DataError, match=r"a\.json: Shakespeare x number 1 has 79 characters, "
                       r"expected 80"):
        leaf.load_leaf_shakespeare(data_dir=tmp_path)
    users = shakespeare_users()
    users[first][1][0] = "ab"
    write_leaf(base(tmp_path, "shakespeare") / "all_data" / "a.json", users)
    with pytest.raises(DataError, match=r"Shakespeare y number 0 has 2 characters, expected 1"):
        leaf.load_leaf_shakespeare(data_dir=tmp_path)


# --- Sent140 --------------------------------------------------------------------------------------

TWEETS = {
    "alice": (["I love this, it's great!", "so sad today... :(", "Lyx is cool"], [1, 0, 1]),
    "bob": (["Worst. Day. Ever!!", "great great GREAT", "meh; whatever"], [0, 1, 0]),
    "carol": (["new phone is great", "can't sleep, so tired", "love love love you",
               "I'm fine."], [1, 0, 1, 1]),
}
TEST_TWEETS = {
    "alice": (["great day, love it"], [1]),
    "bob": (["never again"], [0]),
    "carol": (["so tired and sad"], [0]),
}


def sent140_rows(tweets):
    return {
        user: ([[str(i), "Sat May 16 23:58:44 UTC 2009", "NO_QUERY", user, text]
                for i, text in enumerate(texts)], labels)
        for user, (texts, labels) in tweets.items()
    }


def reference_tokens(text: str) -> list[str]:
    return re.findall(r"[\w']+|[.,!?;]", text.lower())  # LEAF's split_line, lower-cased


@pytest.mark.parametrize("features", ["tokens", "bag_of_words"])
def test_sent140_features(features, tmp_path):
    write_leaf(base(tmp_path, "sent140") / "train" / "a.json", sent140_rows(TWEETS))
    write_leaf(base(tmp_path, "sent140") / "test" / "a.json", sent140_rows(TEST_TWEETS))
    dataset = leaf.load_leaf_sent140(data_dir=tmp_path, features=features, vocab_size=8,
                                     sequence_length=4)
    validate_dataset(dataset)
    counts = collections.Counter(
        token for texts, _ in TWEETS.values() for text in texts for token in reference_tokens(text)
    )
    vocab = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:8]
    assert dataset.info["vocab"] == vocab and dataset.info["vocab_size"] == 10
    ids = {word: i + 2 for i, word in enumerate(vocab)}
    for split, tweets in ((dataset.train, TWEETS), (dataset.test, TEST_TWEETS)):
        assert split.client_ids.tolist() == list(tweets)
        for i, (texts, labels) in enumerate(tweets.values()):
            client = split.client(i)
            np.testing.assert_array_equal(client["y"], labels)
            for j, text in enumerate(texts):
                tokens = reference_tokens(text)
                if features == "tokens":
                    expected = [ids.get(t, 1) for t in tokens[:4]]
                    expected += [0] * (4 - len(expected))
                    assert client["x"][j].tolist() == expected, text
                else:
                    bag = np.zeros(8, np.float32)
                    for t in tokens:
                        if t in ids:
                            bag[ids[t] - 2] += 1
                    np.testing.assert_array_equal(client["x"][j], bag)
    expected_shape = (4,) if features == "tokens" else (8,)
    assert dataset.info["input_shape"] == expected_shape
    assert dataset.info["input_dtype"] == ("int32" if features == "tokens" else "float32")
    assert dataset.info["num_classes"] == 2


def test_sent140_bad_rows(tmp_path):
    rows = sent140_rows(TWEETS)
    rows["bob"][0][1] = ["1", "date", "NO_QUERY", "bob"]  # no text
    write_leaf(base(tmp_path, "sent140") / "all_data" / "a.json", rows)
    with pytest.raises(DataError, match=r"a\.json: a Sent140 x is .*expected \[tweet id, date, "
                       r"query, user, text\]"):
        leaf.load_leaf_sent140(data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"features must be 'tokens' or 'bag_of_words'"):
        leaf.load_leaf_sent140(data_dir=tmp_path, features="glove")


# --- CelebA ---------------------------------------------------------------------------------------


def celeba_files(tmp_path: Path, all_data: bool = False, size=(178, 218)):
    """3 celebrities' images (JPEG, CelebA's aligned size) and LEAF's JSON (labels as floats,
    as LEAF's ``(int(a) + 1) / 2`` writes them)."""
    folder = base(tmp_path, "celeba") / "raw" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, 10)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            folder / name)
    users = {"7": (names[:3], [1.0, 0.0, 1.0]), "12": (names[3:5], [0.0, 0.0]),
             "2880": (names[5:9], [1.0, 1.0, 0.0, 1.0])}
    if all_data:
        write_leaf(base(tmp_path, "celeba") / "all_data" / "all_data.json", users)
    else:
        write_leaf(base(tmp_path, "celeba") / "train" / "a.json",
                   {u: (x[:-1], y[:-1]) for u, (x, y) in users.items()})
        write_leaf(base(tmp_path, "celeba") / "test" / "a.json",
                   {u: (x[-1:], y[-1:]) for u, (x, y) in users.items()})
    return folder, users


def test_celeba_images_are_read_and_resized_like_leaf(tmp_path):
    folder, users = celeba_files(tmp_path)
    dataset = leaf.load_leaf_celeba(data_dir=tmp_path)
    validate_dataset(dataset)
    assert dataset.train.client_ids.tolist() == list(users)
    for i, (names, labels) in enumerate(users.values()):
        client = dataset.train.client(i)
        np.testing.assert_array_equal(client["y"], np.asarray(labels[:-1], np.int32))
        for j, name in enumerate(names[:-1]):
            with Image.open(folder / name) as image:  # LEAF's _load_image
                expected = np.array(image.resize((84, 84)).convert("RGB"))
            np.testing.assert_array_equal(client["x"][j] * np.float32(255),
                                          expected.astype(np.float32))
        assert dataset.test.client(i)["x"].shape == (1, 84, 84, 3)
    assert dataset.info["input_shape"] == (84, 84, 3) and dataset.info["num_classes"] == 2


def test_celeba_missing_images(tmp_path):
    folder, _ = celeba_files(tmp_path, all_data=True)
    (folder / "000004.jpg").unlink()
    with pytest.raises(DataError, match=r"CelebA image .*000004\.jpg not found"):
        leaf.load_leaf_celeba(data_dir=tmp_path)
    (folder / "000004.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"000004\.jpg: not a readable image"):
        leaf.load_leaf_celeba(data_dir=tmp_path)
    elsewhere = tmp_path / "nowhere" / "img_align_celeba"
    with pytest.raises(FileNotFoundError) as error:
        leaf.load_leaf_celeba(data_dir=tmp_path, images_dir=elsewhere)
    message = str(error.value)
    assert f"CelebA image folder {elsewhere} not found" in message
    assert "img_align_celeba.zip" in message and "images_dir" in message


def test_celeba_rejects_paths_in_names(tmp_path):
    celeba_files(tmp_path, all_data=True)
    write_leaf(base(tmp_path, "celeba") / "all_data" / "all_data.json",
               {"7": (["../../secret.jpg"], [1])})
    with pytest.raises(DataError, match=r"all_data\.json: a CelebA x is '\.\./\.\./secret\.jpg'"):
        leaf.load_leaf_celeba(data_dir=tmp_path)


# --- configs --------------------------------------------------------------------------------------

TINY_RUN = ["rounds=2", "eval.every=1", "log.every=1", "log.progress=false", "log.plot=false",
            "cohort.size=2", "client.batch_size=2"]


def run_config(config: str, tmp_path: Path, *overrides: str) -> dict:
    workdir = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / config), *TINY_RUN, *overrides,
                 f"dataset.data_dir={tmp_path}", "--workdir", str(workdir)]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final"], summary
    assert all(np.isfinite(v) for k, v in summary["final"].items() if k.endswith("accuracy"))
    return summary


def test_femnist_config_runs(tmp_path):
    write_leaf(base(tmp_path, "femnist") / "train" / "a.json", femnist_users([5, 3, 7], seed=1))
    write_leaf(base(tmp_path, "femnist") / "test" / "a.json", femnist_users([2, 1, 1], seed=2))
    run_config("femnist_cnn_fedavg.yaml", tmp_path)


def test_leaf_shakespeare_config_runs(tmp_path):
    write_leaf(base(tmp_path, "shakespeare") / "all_data" / "a.json", shakespeare_users())
    # A narrower, one-layer LSTM and fewer local steps than the config's keep the CPU test quick
    # (the suite's legacy XLA:CPU fusion emitters compile the 2-layer round several times
    # slower; tests/models/test_lstm.py checks 2-layer LSTMs).
    run_config("leaf_shakespeare_fedavg.yaml", tmp_path, "model.hidden=32", "model.num_layers=1",
               "client.local_steps=2")


def test_sent140_config_runs(tmp_path):
    write_leaf(base(tmp_path, "sent140") / "train" / "a.json", sent140_rows(TWEETS))
    write_leaf(base(tmp_path, "sent140") / "test" / "a.json", sent140_rows(TEST_TWEETS))
    run_config("sent140_fedavg.yaml", tmp_path)


def test_celeba_config_runs(tmp_path):
    celeba_files(tmp_path, size=(40, 48))
    # 32x32 instead of LEAF's 84x84 keeps the CNN small enough for a quick CPU test.
    run_config("celeba_cnn_fedavg.yaml", tmp_path, "dataset.image_size=32")
